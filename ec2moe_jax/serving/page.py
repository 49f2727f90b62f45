"""The page at ``/`` of ``ec2moe api``: a prompt box whose completion streams in as it is
generated (``POST /v1/completions`` with ``stream: true``, read as server-sent events), and a
live panel that polls ``GET /ec2moe/status`` every second: the current plan (split, resident
experts, codec), the link the end client measures (RTT, uplink), the queue, and TTFT/TPOT.
A person can watch the re-planner react when the link changes.

Self-contained (no CDN, no external font or script) so it works offline.
``/?prompt=TEXT&max_tokens=N&temperature=T&autorun=1`` runs one completion on load (greedy
unless T is given; the headless-browser test uses it) and then stops polling; when a
completion ends, ``#done`` holds a JSON record of what the page saw.
"""

PAGE = """<!doctype html>
<html lang="en"><head><meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>ec2moe</title>
<style>
  body { font: 15px/1.4 system-ui, sans-serif; margin: 0; background: #f4f5f7; color: #1d2330; }
  header { background: #1d2330; color: #fff; padding: 10px 18px; }
  header b { font-size: 17px; } header span { opacity: .75; margin-left: 10px; }
  main { display: grid; grid-template-columns: minmax(0, 3fr) minmax(260px, 2fr);
         gap: 16px; padding: 16px; }
  section { background: #fff; border-radius: 8px; padding: 12px 14px;
            box-shadow: 0 1px 3px rgba(0,0,0,.12); }
  h2 { font-size: 14px; text-transform: uppercase; letter-spacing: .05em; color: #5b6478;
       margin: 0 0 8px; }
  textarea { width: 100%; box-sizing: border-box; height: 70px; font: 14px monospace; }
  .row { display: flex; gap: 10px; align-items: center; margin: 8px 0; flex-wrap: wrap; }
  input[type=number] { width: 70px; }
  button { background: #2f6fde; color: #fff; border: 0; border-radius: 5px;
           padding: 6px 16px; font-size: 14px; cursor: pointer; }
  button:disabled { background: #9bb4e0; }
  #out { white-space: pre-wrap; font: 15px/1.45 monospace; min-height: 180px;
         background: #fbfbfd; border: 1px solid #dde1e8; border-radius: 5px; padding: 8px; }
  #out .prompt { color: #6b7385; } #out .gen { color: #0b3d91; font-weight: 600; }
  #meta { color: #5b6478; font-size: 13px; min-height: 18px; }
  table { border-collapse: collapse; width: 100%; font-size: 13px; }
  td { padding: 3px 4px; border-bottom: 1px solid #eef0f4; vertical-align: top; }
  td:first-child { color: #5b6478; white-space: nowrap; width: 38%; }
  #err { color: #b3261e; }
  #done { display: none; }
</style></head>
<body>
<header><b>ec2moe</b><span id="model">model ...</span><span id="where"></span></header>
<main>
<section>
  <h2>Prompt</h2>
  <textarea id="prompt">ROMEO:</textarea>
  <div class="row">
    <label>max tokens <input id="max" type="number" min="1" value="40"></label>
    <label>temperature <input id="temp" type="number" min="0" max="2" step="0.1"
      value="0"></label>
    <button id="go">Generate</button>
  </div>
  <h2>Completion (streamed)</h2>
  <div id="out"></div>
  <div id="meta"></div><div id="err"></div>
  <pre id="done"></pre>
</section>
<section>
  <h2>Live</h2>
  <table id="panel"><tbody></tbody></table>
</section>
</main>
<script>
"use strict";
const $ = (id) => document.getElementById(id);
const ms = (s) => (s === null || s === undefined) ? "-" : (1000 * s).toFixed(1) + " ms";
const mbit = (b) => (b === null || b === undefined) ? "-" : (b / 1e6).toFixed(2) + " Mbit/s";
let model = null;

function rows(pairs) {
  const body = $("panel").tBodies[0];
  body.innerHTML = "";
  for (const [k, v] of pairs) {
    const tr = body.insertRow();
    tr.insertCell().textContent = k;
    tr.insertCell().textContent = v;
  }
}

async function poll() {
  try {
    const s = await (await fetch("/ec2moe/status")).json();
    model = s.model;
    $("model").textContent = s.model;
    $("where").textContent = s.backend;
    const p = s.plan || {}, q = s.queue, lat = s.latency, l = s.link;
    const pairs = [
      ["plan", p.text || ("split " + p.split)],
      ["split", p.split + " of " + p.layers + " layers on the end"],
      ["resident experts", (p.resident && p.resident.length) ? p.resident.join(", ") : "-"],
      ["codec on the link", p.codec || "-"],
      ["re-plans", s.replans === undefined ? "-" : s.replans],
      ["queue", q.running + " running, " + q.waiting + " waiting (limit " + q.limit + ")"],
      ["served / cancelled / 429", q.served + " / " + q.cancelled + " / " + q.rejected_429],
      ["TTFT (median)", ms(lat.median_ttft_s)],
      ["TPOT (median)", ms(lat.median_tpot_s)],
      ["queue wait (median)", ms(lat.median_queue_s)],
    ];
    if (l) {
      pairs.push(["link RTT", ms(l.rtt_s)], ["uplink", mbit(l.up_bps)],
                 ["server queue / step", ms(l.server_queue_s) + " / " + ms(l.server_compute_s)],
                 ["bytes up / down", l.bytes_up + " / " + l.bytes_down],
                 ["reconnects", l.reconnects]);
    }
    rows(pairs);
  } catch (e) { $("err").textContent = "status: " + e; }
}

async function generate() {
  const prompt = $("prompt").value;
  const out = $("out"), go = $("go");
  out.innerHTML = "";
  const pre = document.createElement("span"); pre.className = "prompt";
  pre.textContent = prompt;
  const gen = document.createElement("span"); gen.className = "gen";
  out.append(pre, gen);
  $("err").textContent = ""; $("meta").textContent = "waiting for the first token ...";
  go.disabled = true;
  const t0 = performance.now();
  let chunks = 0, first = null, ext = null, finish = null;
  try {
    if (!model) await poll();
    const r = await fetch("/v1/completions", {method: "POST",
      headers: {"Content-Type": "application/json"},
      body: JSON.stringify({model: model, prompt: prompt, stream: true,
        max_tokens: Number($("max").value), temperature: Number($("temp").value)})});
    if (!r.ok) throw new Error(r.status + " " + (await r.text()));
    const reader = r.body.getReader(), dec = new TextDecoder();
    let buf = "";
    for (;;) {
      const {value, done} = await reader.read();
      if (done) break;
      buf += dec.decode(value, {stream: true});
      let at;
      while ((at = buf.indexOf("\\n\\n")) >= 0) {
        const line = buf.slice(0, at); buf = buf.slice(at + 2);
        if (!line.startsWith("data: ")) continue;
        const data = line.slice(6);
        if (data === "[DONE]") continue;
        const msg = JSON.parse(data);
        if (msg.error) throw new Error(msg.error.message);
        const c = msg.choices[0];
        if (c.text) {
          if (first === null) first = performance.now() - t0;
          gen.textContent += c.text; chunks += 1;
          $("meta").textContent = chunks + " chunks streamed";
        }
        if (c.finish_reason) finish = c.finish_reason;
        if (msg.ec2moe) ext = msg.ec2moe;
      }
    }
    $("meta").textContent = chunks + " chunks streamed; finish: " + finish +
      "; TTFT " + ms(ext && ext.ttft_s) + ", TPOT " + ms(ext && ext.tpot_s) +
      "; bytes up " + (ext ? ext.bytes_up : "-");
  } catch (e) { $("err").textContent = String(e); }
  go.disabled = false;
  await poll();
  $("done").textContent = JSON.stringify({prompt: prompt, text: gen.textContent,
    chunks: chunks, finish_reason: finish, first_chunk_ms: first,
    total_ms: performance.now() - t0, ec2moe: ext, error: $("err").textContent || null});
  document.title = "ec2moe: done";
}

$("go").onclick = generate;
const q = new URLSearchParams(location.search);
if (q.has("prompt")) $("prompt").value = q.get("prompt");
if (q.has("max_tokens")) $("max").value = q.get("max_tokens");
if (q.has("temperature")) $("temp").value = q.get("temperature");
poll();
const timer = setInterval(poll, 1000);
// autorun is for headless browsers: with nothing left pending after the completion, their
// virtual time runs out at once and the screenshot shows the finished text.
if (q.get("autorun") === "1") generate().then(() => clearInterval(timer));
</script>
</body></html>
"""
