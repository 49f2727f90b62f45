"""Serving benchmark: real client processes against one real server through a shaping relay.

What is measured and what is emulated (stated in the JSON next to every figure):

* measured: one ``ec2moe serve`` process and 1..16 end client processes (each its own Python
  and JAX runtime, the end layers and codec of its plan), real gRPC over real TCP sockets on
  127.0.0.1, serialisation, the server's continuous batching, all on this CPU (both sides
  share its cores: a client's compute slows the server and vice versa); times are wall-clock
  at the client (``time.time``: TTFT from the request's start, TPOT between its tokens);
  aggregate decode tokens/s counts the tokens that arrive while every client is decoding
  (from the last client's first token to the first client's last) over that window, and
  aggregate tokens/s all tokens over the whole run (staggered prefills included);
  bytes per token are counted at the relay's sockets (HTTP/2 frames: gRPC framing and
  protobuf included); batch occupancy is the server's (sessions per batched step);
* emulated: the link's one-way delay and bandwidth, by an asyncio relay in this process
  (:mod:`ec2moe_jax.serving.relay`), with the presets' figures; the relay measures how late
  it delivers each chunk past its emulated arrival (``relay_late_s_mean``: its own delay
  when the CPU is busy), and the simulation's links carry it on top of the presets' delay.

The discrete-event simulator (:mod:`ec2moe_jax.bench.sim`) is configured for each run: the
same clients, tokens and link (the preset's bandwidth and RTT), the plan's kind, the
measured bytes per message, the server's measured prefill time and service cycle per
batched step at that concurrency (compute plus its own handling; its time shared by the
sessions of a step, each of which, in a split plan, waits for the whole step), and the
clients' measured time per step between a reply and the next request (end stage, codec,
serialisation), a cloud-only client's stream request after its prefill's reply (one more
uplink), and the link's round trip: for a split, as its clients measured it per decode step
(reply wall time minus the server's reported queue wait and compute: the emulated link plus
both gRPC stacks and the wait for a core of the shared CPU, which the simulator's independent
end devices do not otherwise see); for cloud-only, the preset's delay plus the relay's
measured lateness. Its mean request latency is compared with the measured one.
"""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
import tempfile
import time

import numpy as np

LINKS = ("wifi", "lte")  # fast: 100 Mbit/s, 10 ms RTT; LTE: 20 Mbit/s, 50 ms RTT
PROMPT_LEN = 16
SLOTS = 16


def random_workdir(config: str, path: str) -> str:
    """A workdir of ``config`` with random parameters (created once): serving speed does not
    depend on training, and the bench must not wait for a training run."""
    from ec2moe_jax.training.workdir import STATS_FILE

    if os.path.isdir(os.path.join(path, "checkpoints")):
        return path
    import jax

    from ec2moe_jax.config import load_config
    from ec2moe_jax.models.lm import MoELM, init_params
    from ec2moe_jax.sharding import unbox
    from ec2moe_jax.training.loop import save_params

    cfg = load_config(config)
    params = unbox(init_params(MoELM(cfg.model), jax.random.key(0)))
    save_params(cfg, path, params)
    assert not os.path.exists(os.path.join(path, STATS_FILE))
    return path


# ----- client processes ----------------------------------------------------------------------

def _client_main() -> None:
    """A client process: reads JSON commands on stdin, answers one JSON line each."""
    os.environ.setdefault("JAX_NUM_CPU_DEVICES", "2")  # the end mesh (mesh.end_devices)
    from ec2moe_jax.pipeline.plans import PipelinePlan
    from ec2moe_jax.serving.client import connect
    from ec2moe_jax.training import load_run

    workdir = json.loads(sys.stdin.readline())["workdir"]
    run = load_run(workdir, progress=False)
    num_layers = run[0].cfg.model.num_layers
    print(json.dumps({"ready": True}), flush=True)
    clients = {}
    for line in sys.stdin:
        cmd = json.loads(line)
        if cmd.get("quit"):
            break
        key = json.dumps(cmd["plan"], sort_keys=True)
        prompt = cmd["prompt"]
        if key not in clients:
            plan = PipelinePlan(**{**cmd["plan"], "resident": tuple(cmd["plan"]["resident"])})
            if plan.split == num_layers:  # end-only: nothing to serve, all runs here
                clients[key] = _Local(workdir, plan, run)
            else:
                clients[key] = connect(cmd["address"], workdir, plan, run=run, timeout_s=120)
            clients[key].warm_up(len(prompt))
        c = clients[key]
        time.sleep(max(0.0, cmd.get("start_at", 0.0) - time.time()))
        times, t0, stream = [], time.time(), cmd.get("stream", False)
        up0, down0 = c.stats.bytes_up, c.stats.bytes_down
        rtt0 = (c.stats.rtt_sum_s, c.stats.rtt_count)

        def on_token(token, times=times, stream=stream):
            times.append(time.time())
            if stream:  # one line per token, as it arrives (the demo prints them)
                print(json.dumps({"token": int(token)}), flush=True)

        tokens = c.generate(prompt, cmd["tokens"], on_token)
        print(json.dumps({"start": t0, "times": times, "tokens": [int(t) for t in tokens],
                          "end_s": c.stats.end_s, "end_prefill_s": c.stats.end_prefill_s,
                          "client_step_s": c.stats.client_step_s,
                          "bytes_up": c.stats.bytes_up - up0,
                          "bytes_down": c.stats.bytes_down - down0,
                          "rtt_sum_s": c.stats.rtt_sum_s - rtt0[0],
                          "rtt_count": c.stats.rtt_count - rtt0[1],
                          "reconnects": c.stats.reconnects}), flush=True)
    for c in clients.values():
        c.close()


class _Local:
    """An end-only plan run in the client process (the EndClient's interface, no server)."""

    def __init__(self, workdir: str, plan, run):
        import jax

        from ec2moe_jax.pipeline import EndEngine, runtime
        from ec2moe_jax.serving.client import LinkStats
        from ec2moe_jax.sharding import make_mesh

        setup, params, splits, freq = run
        n = setup.cfg.mesh.end_devices
        mesh = make_mesh(jax.devices()[:n], n, 1)
        stages, _ = runtime.prepare(setup.model, params, plan, mesh, None, frequencies=freq,
                                    workdir=workdir, train_tokens=splits.train, side="end")
        self.end, self.stats, self.rng = EndEngine(stages), LinkStats(), jax.random.key(0)

    def generate(self, prompt, n, on_token) -> list[int]:
        import jax

        cache = self.end.init_cache(1)
        cache, out, self.stats.end_prefill_s = self.end.prefill(
            cache, np.asarray([prompt], np.int32), self.rng)
        token = np.asarray(out.token)
        on_token(int(token[0]))
        steps, walls, tokens = [], [], [int(token[0])]
        for _ in range(n - 1):
            t0 = time.monotonic()
            cache, out, dt = self.end.step(cache, token, self.rng)
            token = np.asarray(out.token)
            steps.append(dt)
            tokens.append(int(token[0]))
            on_token(tokens[-1])
            walls.append(time.monotonic() - t0)
        # end_s: the stage's compute; client_step_s: the device's whole share of a step (the
        # stage, fetching its token, the caller's on_token), as a split client measures it.
        self.stats.end_s = float(np.mean(steps)) if steps else 0.0
        self.stats.client_step_s = float(np.mean(walls)) if walls else 0.0
        jax.block_until_ready(cache)
        return tokens

    def warm_up(self, prompt_len: int) -> None:
        self.generate([0] * prompt_len, 2, lambda _: None)

    def close(self) -> None:
        pass


class _Pool:
    """``n`` client processes, started once and reused for every run."""

    def __init__(self, n: int, workdir: str):
        env = {**os.environ, "JAX_PLATFORMS": os.environ.get("JAX_PLATFORMS", "cpu")}
        env.pop("JAX_NUM_CPU_DEVICES", None)
        self.procs = [subprocess.Popen([sys.executable, "-m", "ec2moe_jax.bench.serving"],
                                       stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                       text=True, env=env) for _ in range(n)]
        for p in self.procs:
            p.stdin.write(json.dumps({"workdir": workdir}) + "\n")
            p.stdin.flush()
        for p in self.procs:
            self._read(p)

    @staticmethod
    def _read(p) -> dict:
        line = p.stdout.readline()
        if not line:
            raise RuntimeError(f"a client process exited with {p.wait()}")
        return json.loads(line)

    def run(self, n: int, command: dict) -> list[dict]:
        return self.run_each([command] * n)

    def run_each(self, commands: list[dict], on_token=None) -> list[dict]:
        """Sends ``commands[i]`` to client ``i`` and returns their result lines; a client
        asked to ``stream`` answers one ``{"token": id}`` line per token first, passed to
        ``on_token(i, id)`` as it arrives (the other clients' lines wait in their pipes)."""
        for p, command in zip(self.procs, commands, strict=False):
            p.stdin.write(json.dumps(command) + "\n")
            p.stdin.flush()
        out = []
        for i, p in enumerate(self.procs[:len(commands)]):
            line = self._read(p)
            while "token" in line:
                if on_token is not None:
                    on_token(i, line["token"])
                line = self._read(p)
            out.append(line)
        return out

    def close(self) -> None:
        for p in self.procs:
            try:
                p.stdin.write(json.dumps({"quit": True}) + "\n")
                p.stdin.close()
                p.wait(30)
            except (OSError, subprocess.TimeoutExpired):
                p.kill()


def _server(workdir: str, warm: str, ready: str, cache_len: int, devices: int, *,
            prompt_len: int = PROMPT_LEN):
    if os.path.exists(ready):
        os.remove(ready)
    proc = subprocess.Popen(
        [sys.executable, "-m", "ec2moe_jax", "serve", "--workdir", workdir, "--port", "0",
         "--slots", str(SLOTS), "--devices", str(devices), "--cache-len", str(cache_len),
         "--warm", warm, "--warm-prompt", str(prompt_len), "--ready-file", ready],
        stdout=subprocess.DEVNULL)
    deadline = time.monotonic() + 900
    while not os.path.exists(ready):
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            raise RuntimeError("the server did not start (see its stderr above)")
        time.sleep(0.2)
    with open(ready) as f:
        return proc, int(f.read())


@contextlib.contextmanager
def serving_setup(workdir: str, groups, *, clients: int, cache_len: int, devices: int,
                  prompt_len: int = PROMPT_LEN):
    """An ``ec2moe serve`` process of ``workdir`` (``groups``: the (split, codec) pairs it
    compiles before listening), a relay in front of it (unshaped until ``set_shape``) and a
    pool of ``clients`` client processes; yields ``(port, relay, pool)`` and stops all of them
    on exit, on error too.

    Raises:
      RuntimeError: the server or a client process failed to start.
    """
    from ec2moe_jax.serving.relay import RelayThread

    warm = ",".join(f"{s}:{c}" for s, c in sorted(groups))
    ready = os.path.join(tempfile.mkdtemp(prefix="ec2moe-serving-"), "port")
    proc, port = _server(workdir, warm, ready, cache_len, devices, prompt_len=prompt_len)
    relay, pool = RelayThread(("127.0.0.1", port)), None
    try:
        pool = _Pool(clients, workdir)
        yield port, relay, pool
    finally:
        if pool is not None:
            pool.close()
        relay.close()
        proc.terminate()
        proc.wait(30)


# ----- one run -------------------------------------------------------------------------------

def _quantiles(x) -> dict:
    x = np.asarray(x, np.float64)
    return {"p50": float(np.quantile(x, 0.5)), "p99": float(np.quantile(x, 0.99)),
            "mean": float(x.mean())}


def _measure(pool: _Pool, stub, relay, n: int, plan, address: str, tokens: int) -> dict:
    from ec2moe_jax.serving.protocol import pb

    prompt = [(7 * i + 65) % 256 for i in range(PROMPT_LEN)]
    command = {"address": address, "plan": plan.to_json(), "prompt": prompt}
    pool.run(n, {**command, "tokens": 2})  # connect, compile, first session (not measured)
    before, bytes0, late0 = stub.Stats(pb.StatsRequest(), timeout=30), relay.bytes(), \
        relay.lateness()
    out = pool.run(n, {**command, "tokens": tokens, "start_at": time.time() + 0.5})
    after, bytes1, late1 = stub.Stats(pb.StatsRequest(), timeout=30), relay.bytes(), \
        relay.lateness()
    chunks = late1["chunks"] - late0["chunks"]
    start = min(r["start"] for r in out)
    last = max(r["times"][-1] for r in out)
    # Steady state: from the moment every client has its first token to the moment the first
    # one finishes, every client is decoding; tokens that arrived in that window over its
    # length is the aggregate decode rate (the prompts' staggered prefills stay outside).
    a, b = max(r["times"][0] for r in out), min(r["times"][-1] for r in out)
    in_window = sum(a < t <= b for r in out for t in r["times"])
    ttft = [r["times"][0] - r["start"] for r in out]
    tpot = [b - a for r in out for a, b in zip(r["times"], r["times"][1:], strict=False)]
    latency = [r["times"][-1] - r["start"] for r in out]
    steps = after.steps - before.steps
    step_tokens = (after.tokens - before.tokens) - n  # minus one prefill token each
    up, down = bytes1["up"] - bytes0["up"], bytes1["down"] - bytes0["down"]
    rtt_total = sum(r.get("rtt_sum_s", 0.0) for r in out)
    rtt_steps = sum(r.get("rtt_count", 0) for r in out)
    return {
        "clients": n,
        "aggregate_tokens_per_s": n * tokens / (last - start),
        # None when some client finished before another began (no common window).
        "aggregate_decode_tokens_per_s": in_window / (b - a) if b > a else None,
        "steady_window_s": b - a,
        "ttft_s": _quantiles(ttft), "tpot_s": _quantiles(tpot),
        "latency_s": _quantiles(latency),
        "bytes_per_token": {"up": up / (n * tokens), "down": down / (n * tokens)},
        "server_batch_occupancy": step_tokens / steps if steps else None,
        "server_step_s_median": after.step_s, "server_prefill_s_median": after.prefill_s,
        "server_cycle_s_median": after.cycle_s, "server_step_wall_s_median": after.step_wall_s,
        "client_end_step_s": float(np.mean([r["end_s"] for r in out])),
        "client_step_s": float(np.mean([r["client_step_s"] for r in out])),
        "client_end_prefill_s": float(np.mean([r["end_prefill_s"] for r in out])),
        "reconnects": sum(r["reconnects"] for r in out),
        # A split client's round trip per decode step as it measured it: reply wall time
        # minus the server's reported queue wait and compute (the link, both gRPC stacks,
        # waiting for a core). None without such steps (cloud-only streams, end-only).
        "client_rtt_s_mean": (rtt_total / rtt_steps) if rtt_steps else None,
        # The relay's own delay past each chunk's emulated arrival (the emulated link was
        # this much slower than its preset; the simulation adds it to the preset's delay).
        "relay_late_s_mean": (late1["late_s"] - late0["late_s"]) / chunks if chunks else None,
    }


# ----- the relay against the kernel's shaper -------------------------------------------------

_RECEIVER = """
import socket, sys
host, n = sys.argv[1], int(sys.argv[2])
srv = socket.socket()
srv.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
srv.bind((host, 0))
srv.listen()
print(srv.getsockname()[1], flush=True)
c, _ = srv.accept()
got = 0
while got < n:
    got += len(c.recv(1 << 16))
c.sendall(b"k")
"""

_SENDER = """
import socket, sys, time
host, port, n = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
c = socket.create_connection((host, port))
t = time.perf_counter()
c.sendall(bytes(n))
c.recv(1)
print(time.perf_counter() - t, flush=True)
"""


def _transfer(recv_prefix: list[str], send_prefix: list[str], host: str, nbytes: int,
              via=None) -> float:
    """Seconds to move ``nbytes`` from a sender process to a receiver process (commands
    prefixed, e.g. by ``ip netns exec NS``), through ``via(port) -> port`` if given."""
    recv = subprocess.Popen([*recv_prefix, sys.executable, "-c", _RECEIVER, host, str(nbytes)],
                            stdout=subprocess.PIPE, text=True)
    try:
        port = int(recv.stdout.readline())
        port = via(port) if via else port
        out = subprocess.run([*send_prefix, sys.executable, "-c", _SENDER, host, str(port),
                              str(nbytes)], capture_output=True, text=True, timeout=120,
                             check=True)
        return float(out.stdout)
    finally:
        recv.kill()
        recv.wait(10)


def link_crosscheck(rates_bps=(5e6, 20e6), nbytes: int = 2_000_000) -> dict:
    """Bandwidth of the user-space relay against the kernel's token-bucket shaper (``tc
    tbf`` on a veth pair between two network namespaces; needs root and iproute2; the
    kernel here has no netem, so delay is not cross-checked). Each figure: one TCP transfer of
    ``nbytes`` (measured at the sender: until the receiver acknowledges the last byte).

    Returns:
      ``{"rows": [{"rate_bps", "tbf_bps", "relay_bps", "relay_over_tbf"}], "method"}``, or
      ``{"skipped": reason}``.
    """
    from ec2moe_jax.serving.relay import RelayThread, Shape

    if os.geteuid() != 0 or not all(map(_which, ("ip", "tc"))):
        return {"skipped": "needs root and iproute2 (ip netns, tc)"}
    tag = f"ec2x{os.getpid() % 100000}"
    a, b = f"{tag}a", f"{tag}b"

    def ip(*args):
        subprocess.run(["ip", *args], check=True, capture_output=True)

    rows = []
    try:
        ip("netns", "add", a)
        ip("netns", "add", b)
        ip("link", "add", f"{tag}x", "type", "veth", "peer", "name", f"{tag}y")
        ip("link", "set", f"{tag}x", "netns", a)
        ip("link", "set", f"{tag}y", "netns", b)
        ip("-n", a, "addr", "add", "10.213.0.1/24", "dev", f"{tag}x")
        ip("-n", b, "addr", "add", "10.213.0.2/24", "dev", f"{tag}y")
        ip("-n", a, "link", "set", f"{tag}x", "up")
        ip("-n", b, "link", "set", f"{tag}y", "up")
        for rate in rates_bps:
            subprocess.run(["tc", "-n", a, "qdisc", "replace", "dev", f"{tag}x", "root", "tbf",
                            "rate", f"{int(rate)}bit", "burst", "32kbit", "latency", "100ms"],
                           check=True, capture_output=True)
            tbf = _transfer(["ip", "netns", "exec", b], ["ip", "netns", "exec", a],
                            "10.213.0.2", nbytes)
            with RelayThread(("127.0.0.1", 0), Shape(rate_bps=rate)) as relay:
                def via(port, relay=relay):
                    relay.relay.upstream = ("127.0.0.1", port)
                    return relay.port

                user = _transfer([], [], "127.0.0.1", nbytes, via)
            rows.append({"rate_bps": rate, "tbf_bps": 8 * nbytes / tbf,
                         "relay_bps": 8 * nbytes / user, "relay_over_tbf": tbf / user})
    finally:
        for ns in (a, b):
            subprocess.run(["ip", "netns", "del", ns], capture_output=True)
    return {"rows": rows, "method": f"measured: one {nbytes:,}-byte TCP transfer per figure, "
                                    "tc tbf (burst 32 kbit) on a veth between two netns vs "
                                    "the asyncio relay on loopback"}


def _which(name: str) -> bool:
    import shutil

    return shutil.which(name) is not None


# ----- the simulator, configured for a run ---------------------------------------------------

class _RunTiming:
    """Job times and bytes of a measured run: the server's prefill time and its batched step
    time shared by the step's sessions, the clients' end-stage time, the bytes per message
    measured at the relay."""

    def __init__(self, row: dict, kind: str, tokens: int):
        self.row, self.kind, self.tokens = row, kind, tokens
        occ = max(row["server_batch_occupancy"] or 1.0, 1.0)
        # A cloud-only session is stepped back to back (the cycle: compute and the server's
        # handling); a split one whenever its payload arrives (the step as the batcher waits
        # for it: compute and the hand-over to the compute thread).
        per_step = row["server_cycle_s_median" if kind == "cloud-only"
                       else "server_step_wall_s_median"]
        self.whole_step = max(per_step, row["server_step_s_median"])
        self.step = self.whole_step / occ
        b = row["bytes_per_token"]
        self.up_b, self.down_b = b["up"], b["down"]

    def end(self, job, step: int) -> float:
        if self.kind == "cloud-only":
            return 0.0
        if step == 0:
            return self.row["client_end_prefill_s"]
        # The end device's whole share of a step: its stage, the codec, serialisation.
        return self.row["client_step_s"]

    def cloud(self, job, step: int) -> float:
        return self.row["server_prefill_s_median"] if step == 0 else self.step

    def cloud_wait(self, job, step: int) -> float:
        # A split session's step returns when its whole batched step ends; the server's
        # time is shared by the batch (cloud() above). A cloud-only session is fed back at
        # once, so its steps are the cycles themselves.
        if self.kind == "cloud-only" or step == 0:
            return 0.0
        return self.whole_step - self.step

    def up_bytes(self, job, step: int) -> float:
        if self.kind == "cloud-only" and step > 0:
            return 0.0
        return self.up_b * (self.tokens if self.kind == "cloud-only" else 1.0)

    def down_bytes(self, job, step: int) -> float:
        return self.down_b


def simulate(row: dict, kind: str, link, tokens: int) -> float:
    """The simulator's mean request latency for a measured run ``row`` (module docstring)."""
    from ec2moe_jax.bench.sim import (
        CLOUD_ONLY,
        END_ONLY,
        SPLIT,
        DevicePlan,
        Simulator,
        StaticController,
    )
    from ec2moe_jax.pipeline.link import BandwidthTrace

    n = row["clients"]
    plan = DevicePlan(*{"cloud-only": (0, 1, CLOUD_ONLY), "split": (1, 1, SPLIT),
                        "end-only": (1, 1, END_ONLY)}[kind])
    trace = BandwidthTrace.constant(link.bandwidth_bps)
    # The link the clients had: a split client's round trip as it measured it per step (the
    # link, both gRPC stacks and the wait for a core of this shared CPU); otherwise (a
    # cloud-only stream has no per-step round trip) the preset's delay plus what the relay
    # itself added per chunk (measured; 0.2-1.4 ms when the CPU is shared with 16 clients).
    rtt = row.get("client_rtt_s_mean") if kind == "split" else None
    if rtt is None:
        rtt = link.rtt_s + 2 * (row.get("relay_late_s_mean") or 0.0)
    # The client opens its decode stream once the prefill has answered: one more uplink.
    sim = Simulator(_RunTiming(row, kind, tokens), StaticController([plan] * n), [trace] * n,
                    [trace] * n, [rtt] * n, tokens, stream_after_first=True)
    res = sim.run([np.zeros(1)] * n, horizon_s=1e-9)
    return float(np.mean([r.done - r.arrival for r in res.requests]))


# ----- the benchmark -------------------------------------------------------------------------

def _plans(cfg, freq, link_name: str, tokens: int, inputs: dict) -> dict:
    """cloud-only, the scheduler's plan for this CPU over ``link_name`` (``inputs``: the
    calibration, pipeline calibration and codec sweep paths) and, when that plan is not a
    split, a fixed split (layer 1, int8 rank-64 codec), labelled as not chosen."""
    from ec2moe_jax.pipeline.plans import PipelinePlan, baseline, instance, scheduled_plans
    from ec2moe_jax.profiles import link
    from ec2moe_jax.scheduler import codec_options, this_cpu

    dev, cal, cloud_cal = this_cpu(cfg, inputs["calibration"], inputs["pipeline_calibration"])
    inst = instance(cfg, freq, dev, link(link_name), cal, prompt_tokens=PROMPT_LEN,
                    gen_tokens=tokens, cloud_cal=cloud_cal,
                    codecs=codec_options(cfg.d_model, inputs["codec_sweep"]))
    chosen = scheduled_plans(cfg, inst)["ec2moe"][0]
    out = {"cloud-only": baseline("cloud-only", cfg), "ec2moe": chosen}
    if not 0 < chosen.split < cfg.num_layers:  # so the server's split path is measured too
        L, E = cfg.num_layers, cfg.moe.num_experts
        out["split-1-int8-r64"] = PipelinePlan("split-1-int8-r64", 1, (E,) * L, "int8-r64")
    return out


def run(workdir: str, *, clients: list[int], tokens: int, quick: bool, out: str,
        plot: str | None, command: str, inputs: dict, server_devices: int = 1) -> dict:
    """Runs the benchmark (module docstring) and writes ``out`` (JSON) and ``plot`` (PNG).

    Args:
      inputs: paths the scheduler plans with: ``calibration``, ``pipeline_calibration``
        (or None), ``codec_sweep``.
      server_devices: devices of the server's mesh. On a 2-core CPU one is fastest: fake
        devices split the same cores and add collectives (a batch-8 step of the small model
        took 10.0 ms on 2 fake devices, 5.0 ms on 1, measured here).
    """
    import grpc

    from ec2moe_jax.files import write_json_atomic
    from ec2moe_jax.profiles import link
    from ec2moe_jax.serving.protocol import pb_grpc
    from ec2moe_jax.serving.relay import Shape
    from ec2moe_jax.training import load_run

    load_start = os.getloadavg()[0]
    links = LINKS[:1] if quick else LINKS
    setup, _, _, freq = load_run(workdir)
    cfg = setup.cfg.model
    plans = {name: _plans(cfg, freq, name, tokens, inputs) for name in links}
    groups = {(p.split, p.codec) for ps in plans.values() for p in ps.values()
              if p.split < cfg.num_layers}
    cache_len = min(cfg.max_seq_len, 1 << (PROMPT_LEN + tokens - 1).bit_length())
    names = ", ".join(f"{s}:{c}" for s, c in sorted(groups))
    print(f"bench-serving: server for groups {names}, {SLOTS} slots, sessions of {cache_len} "
          f"positions; {max(clients)} client processes", file=sys.stderr, flush=True)
    rows, done = [], set()
    with serving_setup(workdir, groups, clients=max(clients), cache_len=cache_len,
                       devices=server_devices) as (port, relay, pool):
        with grpc.insecure_channel(f"127.0.0.1:{port}") as ch:
            stub = pb_grpc.CloudStub(ch)
            for link_name in links:
                preset = link(link_name)
                relay.set_shape(Shape(delay_s=preset.rtt_s / 2, rate_bps=preset.bandwidth_bps))
                for plan_name, plan in plans[link_name].items():
                    kind = ("cloud-only" if plan.split == 0 else "end-only"
                            if plan.split == cfg.num_layers else "split")
                    if kind == "end-only" and (plan_name, kind) in done:
                        continue  # nothing crosses the link: one run for all links
                    done.add((plan_name, kind))
                    for n in clients:
                        row = _measure(pool, stub, relay, n, plan, relay.address, tokens)
                        row.update(link=link_name if kind != "end-only" else "none",
                                   plan=plan_name, kind=kind, plan_detail=plan.to_json())
                        row["simulated_latency_mean_s"] = simulate(row, kind, preset, tokens)
                        row["simulator_error"] = (row["simulated_latency_mean_s"]
                                                  / row["latency_s"]["mean"] - 1)
                        rows.append(row)
                        occ, rate = (row["server_batch_occupancy"],
                                     row["aggregate_decode_tokens_per_s"])
                        late = row["relay_late_s_mean"]
                        print(f"bench-serving: {row['link']} {plan_name} ({kind}) {n} clients: "
                              f"{'-' if rate is None else f'{rate:.0f}'} decode tok/s (steady), "
                              f"{row['aggregate_tokens_per_s']:.0f} tok/s (run), "
                              f"TPOT p50 {row['tpot_s']['p50'] * 1e3:.1f} ms, occupancy "
                              f"{'-' if occ is None else f'{occ:.2f}'}, sim error "
                              f"{row['simulator_error']:+.0%}, relay late "
                              f"{'-' if late is None else f'{late * 1e3:.2f} ms'}",
                              file=sys.stderr, flush=True)
    result = _summarise(rows, workdir, cfg, tokens, command)
    result["server_devices"] = server_devices
    # Other jobs on this machine share its 2 cores: the 1-minute load average says how much.
    result["load_average_1min"] = {"start": load_start, "end": os.getloadavg()[0]}
    result["link_crosscheck"] = link_crosscheck()
    write_json_atomic(out, result)
    if plot:
        result["plot"] = plot_serving(result, plot)
    return result


def _summarise(rows: list[dict], workdir: str, cfg, tokens: int, command: str) -> dict:
    def rate(link, n):
        return next((r["aggregate_decode_tokens_per_s"] for r in rows
                     if r["link"] == link and r["plan"] == "cloud-only" and r["clients"] == n),
                    None)

    one, eight = rate(LINKS[0], 1), rate(LINKS[0], 8)
    errors = [abs(r["simulator_error"]) for r in rows]
    return {
        "command": command, "workdir": workdir,
        "model": {"d_model": cfg.d_model, "num_layers": cfg.num_layers,
                  "num_experts": cfg.moe.num_experts},
        "prompt_tokens": PROMPT_LEN, "new_tokens": tokens,
        "method": {
            "measured": "one `ec2moe serve` process and N client processes on this CPU (2 "
                        "cores shared by both sides and by other jobs on the machine), real "
                        "gRPC over TCP on 127.0.0.1, wall-clock times at the clients, bytes "
                        "at the relay's sockets; aggregate decode tokens/s over the window "
                        "in which every client is decoding, aggregate tokens/s over the "
                        "whole run",
            "emulated": "the link's one-way delay (RTT/2) and bandwidth per direction, by "
                        "an asyncio relay (presets wifi: 100 Mbit/s, 10 ms RTT; lte: "
                        "20 Mbit/s, 50 ms RTT)",
            "simulated": "bench.sim configured with each run's measured step, prefill and "
                         "end-device times per step and bytes per message, and the link the "
                         "clients had (split: their measured round trip per decode step, "
                         "client_rtt_s_mean; cloud-only: the preset's RTT plus twice the "
                         "relay's lateness); error = simulated / measured mean latency - 1",
        },
        "batching_pays": {"link": LINKS[0], "one_client_decode_tokens_per_s": one,
                          "eight_clients_decode_tokens_per_s": eight,
                          "ratio": None if not (one and eight) else eight / one,
                          "target": 3.0},
        "simulator_error_abs_max": max(errors) if errors else None,
        "rows": rows,
    }


def plot_serving(result: dict, path: str) -> str:
    """Aggregate decode tokens/s and TPOT p50 against client processes, per link and plan."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = result["rows"]
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.8), dpi=120)
    for (link, plan) in sorted({(r["link"], r["plan"]) for r in rows}):
        sel = sorted((r for r in rows if r["link"] == link and r["plan"] == plan),
                     key=lambda r: r["clients"])
        n = [r["clients"] for r in sel]
        style = "o-" if plan == "cloud-only" else "s--"
        kind = sel[0].get("kind", plan)
        label = (f"{plan} ({kind}, here alone)" if kind == "end-only" else
                 f"{plan}, {link} link" if plan == kind else f"{plan} ({kind}), {link} link")
        axes[0].plot(n, [r["aggregate_decode_tokens_per_s"] or np.nan for r in sel], style,
                     label=label)
        axes[1].plot(n, [r["tpot_s"]["p50"] * 1e3 for r in sel], style, label=label)
    for ax, label in zip(axes, ("aggregate decode tokens/s (all clients decoding)",
                                "TPOT p50 (ms)"), strict=True):
        ax.set_xscale("log", base=2)
        ax.set_xlabel("client processes")
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    fig.suptitle("ec2moe serve: measured (processes, sockets, this CPU); link emulated",
                 fontsize=10)
    fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fig.savefig(path)
    plt.close(fig)
    return path


if __name__ == "__main__":
    _client_main()
