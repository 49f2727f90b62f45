"""The OpenAI-compatible API (`ec2moe api`) with the official `openai` client against real
processes on 127.0.0.1 (random free ports, hard timeouts, every process stopped): one API
process running the whole model here ("local"), one in front of an `ec2moe serve` cloud
process (cloud-only plan, "cloud"). The tiny config with random parameters: its greedy text is
bytes with no meaning, but `ec2moe generate` must produce the same bytes."""

import asyncio
import json
import os
import pathlib
import shutil
import subprocess
import sys
import time
import uuid

import httpx
import openai
import pytest

pytestmark = pytest.mark.timeout(240)
PROMPT = "ROMEO:"
NEW = 12
NAME = "run"  # the workdir's folder name: the model id the API serves


class Proc:
    """An `ec2moe` subcommand that writes its bound port to a ready file."""

    def __init__(self, tmp: pathlib.Path, *args: str):
        self.ready = tmp / f"port-{uuid.uuid4().hex}"
        self.log_path = self.ready.with_suffix(".log")
        self.log = open(self.log_path, "w")  # noqa: SIM115 (closed in stop)
        env = {**os.environ, "JAX_PLATFORMS": "cpu"}
        env.pop("JAX_NUM_CPU_DEVICES", None)  # each command picks its own device count
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "ec2moe_jax", *args, "--port", "0", "--ready-file",
             str(self.ready)], stdout=subprocess.DEVNULL, stderr=self.log, env=env)

    def wait(self, timeout_s: float = 120) -> "Proc":
        deadline = time.monotonic() + timeout_s
        while not self.ready.exists():
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"{self.proc.args[3]} did not start: "
                                   f"{self.log_path.read_text()[-3000:]}")
            time.sleep(0.1)
        self.port = int(self.ready.read_text())
        self.address = f"127.0.0.1:{self.port}"
        self.url = f"http://{self.address}"
        return self

    def stop(self) -> None:
        from conftest import stop_process

        stop_process(self.proc, 15)
        self.log.close()


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    """The tiny config (2 layers, 8 experts) with random parameters, saved as a workdir."""
    from conftest import random_workdir

    wd = tmp_path_factory.mktemp("api") / NAME
    random_workdir(str(wd))
    return wd


@pytest.fixture(scope="module")
def servers(workdir):
    """{"local": API with the whole model, "cloud": API in front of "server"}, all started
    at once (the cloud API waits for its server's port)."""
    tmp, wd = workdir.parent, str(workdir)
    started = []
    try:
        server = Proc(tmp, "serve", "--workdir", wd, "--devices", "2", "--slots", "4")
        started.append(server)
        local = Proc(tmp, "api", "--workdir", wd, "--queue", "8")
        started.append(local)
        server.wait()
        cloud = Proc(tmp, "api", "--workdir", wd, "--queue", "8", "--cloud", server.address)
        started.append(cloud)
        yield {"local": local.wait(), "cloud": cloud.wait(), "server": server}
    finally:
        for p in started:
            p.stop()


_REFERENCES: dict = {}


def reference(workdir, n: int, *extra: str, prompt: str = PROMPT) -> str:
    """The new text of `ec2moe generate` (same code path as the command, in this process)."""
    key = (n, extra, prompt)
    if key not in _REFERENCES:
        from ec2moe_jax.cli import run

        text = run(["generate", "--workdir", str(workdir), "--prompt", prompt,
                    "--max-new-tokens", str(n), *extra])
        assert text.startswith(prompt)
        _REFERENCES[key] = text[len(prompt):]
    return _REFERENCES[key]


def client(proc: Proc) -> openai.OpenAI:
    return openai.OpenAI(base_url=proc.url + "/v1", api_key="unused", timeout=60,
                         max_retries=0)


def status(proc: Proc) -> dict:
    return httpx.get(proc.url + "/ec2moe/status", timeout=10).json()


def settled(proc: Proc, predicate, timeout_s: float = 15.0) -> dict:
    """The status once ``predicate(status)`` holds (or fails after ``timeout_s``)."""
    deadline = time.monotonic() + timeout_s
    while True:
        s = status(proc)
        if predicate(s):
            return s
        assert time.monotonic() < deadline, f"status never settled: {json.dumps(s)[:800]}"
        time.sleep(0.05)


def test_models_lists_the_workdir(servers):
    for kind in ("local", "cloud"):
        assert [m.id for m in client(servers[kind]).models.list()] == [NAME]


@pytest.mark.parametrize("kind", ["local", "cloud"])
def test_greedy_completion_equals_generate(servers, workdir, kind):
    want = reference(workdir, NEW)
    c = client(servers[kind])
    r = c.completions.create(model=NAME, prompt=PROMPT, max_tokens=NEW, temperature=0)
    assert r.choices[0].text == want
    assert r.choices[0].finish_reason == "length"
    assert (r.usage.prompt_tokens, r.usage.completion_tokens) == (len(PROMPT), NEW)
    ext = r.model_extra["ec2moe"]
    assert ext["tokens"] == NEW and ext["ttft_s"] > 0 and ext["tpot_s"] > 0
    if kind == "cloud":  # cloud-only: token ids went up, tokens came down
        assert ext["plan"]["split"] == 0 and ext["plan"]["codec"] == "token ids"
        assert ext["bytes_up"] > 0 and ext["bytes_down"] > 0
    else:
        assert ext["plan"]["split"] == ext["plan"]["layers"] and ext["bytes_up"] == 0

    chunks = list(c.completions.create(model=NAME, prompt=PROMPT, max_tokens=NEW,
                                       temperature=0, stream=True))
    pieces = [ch.choices[0].text for ch in chunks if ch.choices and ch.choices[0].text]
    assert "".join(pieces) == want
    assert len(pieces) > 1  # streamed as generated, not one block
    assert chunks[-1].choices[0].finish_reason == "length"
    assert chunks[-1].model_extra["ec2moe"]["tokens"] == NEW


def test_stop_sequence_cuts_the_text(servers, workdir):
    want = reference(workdir, NEW)
    k = next(i for i in range(2, len(want) - 2) if want.find(want[i:i + 2]) == i)
    c = client(servers["local"])
    r = c.completions.create(model=NAME, prompt=PROMPT, max_tokens=NEW, temperature=0,
                             stop=[want[k:k + 2]])
    assert (r.choices[0].text, r.choices[0].finish_reason) == (want[:k], "stop")
    chunks = list(c.completions.create(model=NAME, prompt=PROMPT, max_tokens=NEW,
                                       temperature=0, stop=want[k:k + 2], stream=True))
    assert "".join(ch.choices[0].text for ch in chunks if ch.choices) == want[:k]


def test_seed_reproduces_generate(servers, workdir):
    want = reference(workdir, NEW, "--temperature", "1", "--seed", "5")
    c = client(servers["local"])
    got = [c.completions.create(model=NAME, prompt=PROMPT, max_tokens=NEW, temperature=1,
                                seed=5).choices[0].text for _ in range(2)]
    assert got == [want, want]
    with pytest.raises(openai.BadRequestError, match="seed"):  # the server owns its key
        client(servers["cloud"]).completions.create(model=NAME, prompt=PROMPT, max_tokens=4,
                                                    temperature=1, seed=5)


@pytest.mark.parametrize("stream", [False, True])
def test_chat_without_a_template_is_a_clear_400(servers, stream):
    with pytest.raises(openai.BadRequestError) as e:
        client(servers["cloud"]).chat.completions.create(
            model=NAME, messages=[{"role": "user", "content": "hi"}], stream=stream)
    assert f"model '{NAME}' has no chat template" in e.value.message
    assert e.value.body["param"] == "messages"


BAD = [  # (body, status, the field the answer must name)
    ({"model": NAME, "prompt": PROMPT, "max_tokens": "many"}, 400, "max_tokens"),
    ({"model": NAME, "prompt": PROMPT, "max_tokens": 0}, 400, "max_tokens"),
    ({"model": NAME, "prompt": PROMPT, "max_tokens": 1000}, 400, "max_tokens"),
    ({"model": NAME, "prompt": PROMPT, "temperature": -1}, 400, "temperature"),
    ({"model": NAME, "prompt": PROMPT, "top_p": 0.5}, 400, "top_p"),
    ({"model": NAME, "prompt": PROMPT, "n": 2}, 400, "n"),
    ({"model": NAME, "prompt": PROMPT, "stop": list("abcde")}, 400, "stop"),
    ({"model": NAME, "prompt": PROMPT, "logit_bias": {"1": 2}}, 400, "logit_bias"),
    ({"model": NAME}, 400, "prompt"),
    ({"model": NAME, "prompt": [7, 999]}, 400, "prompt"),
    ({"model": NAME, "prompt": ""}, 400, "prompt"),
    ({"model": "gpt-4o", "prompt": PROMPT}, 404, "model"),
    ({"prompt": PROMPT}, 400, "model"),
]


def test_malformed_bodies_name_the_field(servers):
    url = servers["local"].url
    for body, code, field in BAD:
        r = httpx.post(url + "/v1/completions", json=body, timeout=10)
        err = r.json()["error"]
        assert (r.status_code, err["param"]) == (code, field), (body, err)
        assert err["message"].startswith(field) or f"{field}:" in err["message"], err
    r = httpx.post(url + "/v1/chat/completions", timeout=10, json={
        "model": NAME, "messages": [{"role": "robot", "content": "x"}]})
    assert (r.status_code, r.json()["error"]["param"]) == (400, "messages.0.role")
    r = httpx.post(url + "/v1/completions", content=b'{"model": "run", "prompt": ',
                   headers={"content-type": "application/json"}, timeout=10)
    assert r.status_code == 400 and "not valid JSON" in r.json()["error"]["message"]
    assert client(servers["local"]).completions.create(
        model=NAME, prompt=PROMPT, max_tokens=2, temperature=0).choices[0].text


def test_64_concurrent_requests_against_a_queue_of_8(servers, workdir):
    proc = servers["local"]
    before = status(proc)["queue"]
    aclient = openai.AsyncOpenAI(base_url=proc.url + "/v1", api_key="unused", timeout=120,
                                 max_retries=0)

    async def one():
        return (await aclient.completions.create(model=NAME, prompt=PROMPT, max_tokens=40,
                                                 temperature=0)).choices[0].text

    async def burst():
        try:
            return await asyncio.gather(*(one() for _ in range(64)), return_exceptions=True)
        finally:
            await aclient.close()

    results = asyncio.run(burst())
    texts = [r for r in results if isinstance(r, str)]
    limited = [r for r in results if isinstance(r, openai.RateLimitError)]
    assert len(texts) + len(limited) == 64, [r for r in results if not isinstance(r, str)][:3]
    assert len(limited) > 0 and len(texts) >= 8
    assert set(texts) == {reference(workdir, 40)}  # admitted requests are served in full
    q = settled(proc, lambda s: s["queue"]["admitted"] == 0)["queue"]
    assert q["rejected_429"] - before["rejected_429"] == len(limited)
    assert q["served"] - before["served"] == len(texts)
    assert httpx.get(proc.url + "/health", timeout=10).json() == {"status": "ok"}


@pytest.mark.parametrize("kind", ["local", "cloud"])
def test_disconnect_mid_stream_frees_the_slot(servers, kind):
    proc = servers[kind]
    before = status(proc)["queue"]
    body = {"model": NAME, "prompt": "R", "max_tokens": 63, "temperature": 0, "stream": True}
    with httpx.Client(timeout=30) as http, http.stream("POST", proc.url + "/v1/completions",
                                                       json=body) as r:
        assert r.status_code == 200
        for line in r.iter_lines():
            if line.startswith("data: ") and json.loads(line[6:])["choices"][0]["text"]:
                break  # one token in: hang up
    q = settled(proc, lambda s: s["queue"]["admitted"] == 0)["queue"]
    assert q["cancelled"] - before["cancelled"] == 1  # stopped early, not run to the end
    if kind == "cloud":  # the server's session (KV slot) is freed too
        import grpc

        from ec2moe_jax.serving.protocol import pb, pb_grpc

        with grpc.insecure_channel(servers["server"].address) as ch:
            stub = pb_grpc.CloudStub(ch)
            deadline = time.monotonic() + 10
            while stub.Stats(pb.StatsRequest(), timeout=5).sessions:
                assert time.monotonic() < deadline, "the server kept the session"
                time.sleep(0.05)
    assert client(proc).completions.create(model=NAME, prompt=PROMPT, max_tokens=3,
                                           temperature=0).choices[0].text


def browse(url: str, out_dir: pathlib.Path, browser: str) -> dict:
    """Opens ``url`` (the page with ``autorun=1``) in headless chromium once, taking a
    screenshot (``out_dir/api_page.png``) and the DOM, whose ``#done`` element holds the
    page's own JSON record of the streamed completion shown. Returns that record."""
    import html

    dom = subprocess.run(
        [browser, "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars",
         "--window-size=1200,700", "--virtual-time-budget=600000",
         f"--screenshot={out_dir / 'api_page.png'}", "--dump-dom", url],
        timeout=120, check=True, capture_output=True, text=True).stdout
    start = dom.index('<pre id="done">') + len('<pre id="done">')
    return json.loads(html.unescape(dom[start:dom.index("</pre>", start)]))


def test_page_streams_a_completion_in_headless_chromium(servers, workdir, tmp_path):
    """The page at / in Debian's chromium runs a streamed completion on load; the screenshot
    and the page's record of what it received are checked (results/api_page.png comes from
    the same function, run by this module's __main__ on a trained model)."""
    browser = shutil.which("chromium") or shutil.which("chromium-browser")
    if browser is None:
        pytest.skip("chromium is not installed (apt-get install chromium): the page's "
                    "browser test needs it")
    seen = browse(f"{servers['local'].url}/?prompt={PROMPT}&max_tokens=40&autorun=1",
                  tmp_path, browser)
    png = tmp_path / "api_page.png"
    assert png.stat().st_size > 10_000 and png.read_bytes()[:4] == b"\x89PNG"
    assert seen["error"] is None and seen["finish_reason"] == "length"
    assert seen["text"] == reference(workdir, 40) and seen["chunks"] > 1
    assert seen["ec2moe"]["tokens"] == 40


if __name__ == "__main__":
    # python tests/test_openai_api.py URL OUT_DIR: the page of a running `ec2moe api` in
    # headless chromium; writes OUT_DIR/api_page.png and OUT_DIR/api_page.json.
    import urllib.parse

    page_url, out = sys.argv[1], pathlib.Path(sys.argv[2])
    record = browse(page_url, out, shutil.which("chromium"))
    base = urllib.parse.urlsplit(page_url)
    api_status = httpx.get(f"{base.scheme}://{base.netloc}/ec2moe/status", timeout=10).json()
    with open(out / "api_page.json", "w") as f:
        json.dump({"url": page_url, "seen_by_the_page": record, "status_after": api_status,
                   "command": "python tests/test_openai_api.py " + " ".join(sys.argv[1:]),
                   "method": "headless chromium (Debian) on this 2-core CPU; the page's own "
                             "record of the streamed completion"}, f, indent=1)
        f.write("\n")
    print(json.dumps(record, indent=1))


def test_chat_through_an_imported_models_template_equals_generate(tmp_path):
    """An imported model (the Qwen3-MoE fixture with a trained tokenizer and a ChatML
    template) served in this process (`ec2moe api --hf`'s backend, the app over an in-process
    transport): a one-turn greedy chat equals `ec2moe generate --hf --prompt`, which renders
    the same template around one user turn; streamed deltas give the same text."""
    from fastapi.testclient import TestClient
    from test_hf_tokenizer import CHATML, FIX, _tokenizer_json

    from ec2moe_jax.cli import run
    from ec2moe_jax.cli.api import _hf_backend
    from ec2moe_jax.serving.openai_api import create_app

    folder = tmp_path / "qwen3_moe"
    shutil.copytree(os.path.join(FIX, "qwen3_moe"), folder)
    (folder / "tokenizer.json").write_text(_tokenizer_json(96))
    (folder / "tokenizer_config.json").write_text(json.dumps(
        {"chat_template": CHATML, "eos_token": "<|im_end|>", "bos_token": None}))
    want = run(["generate", "--hf", str(folder), "--prompt", "the cat", "--max-new-tokens", "8"])
    with TestClient(create_app(_hf_backend(str(folder), "qwen3"), queue_size=2)) as http:
        c = openai.OpenAI(base_url="http://testserver/v1", api_key="unused", http_client=http,
                          max_retries=0)
        turn = [{"role": "user", "content": "the cat"}]
        r = c.chat.completions.create(model="qwen3", messages=turn, max_tokens=8, temperature=0)
        assert r.choices[0].message.content == want
        chunks = c.chat.completions.create(model="qwen3", messages=turn, max_tokens=8,
                                           temperature=0, stream=True)
        assert "".join(ch.choices[0].delta.content or "" for ch in chunks if ch.choices) == want
        two = c.chat.completions.create(model="qwen3", max_tokens=2, temperature=0, messages=[
            {"role": "system", "content": "the dog"}, *turn])
        assert two.usage.prompt_tokens > r.usage.prompt_tokens  # the system turn is in
