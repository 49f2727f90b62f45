"""Benchmark: the cloud as one process against the same cloud as 2 processes on
``jax.distributed`` (``ec2moe serve --num-processes 2``), with 1, 4 and 16 real client
processes (cloud-only sessions), side by side in one run.

Both clouds have the same mesh, ('data' 1, 'expert' 2) by default: one process with 2 fake
CPU devices, or 2 processes with 1 device each and the expert axis across them (each holds
half of every layer's experts). What differs is what a distributed step adds: process 0
broadcasts each call to the other process (``multihost_utils``), every host array placed
on the global mesh is checked to be equal on both processes (JAX's ``device_put`` does it),
and the expert reductions cross processes (gloo over loopback TCP).

Measured on this machine, and only that: both clouds, the 16 client processes and this
process share its cores, so on a 2-core CPU the 2-process cloud cannot gain compute; it
shows the overhead of the distributed step, not a speed-up. Metrics per (processes,
clients), medians over ``repeats`` interleaved repeats (the two clouds alternate within
each repeat, so load drifts hit both): aggregate decode tokens/s while every client decodes
(:func:`~.serving._measure`), time per output token, and the server's own step time (its
Stats: median measured seconds per batched step; on the 2-process cloud this includes the
broadcast of the step's inputs) and step wall time (the batcher's wait for a step), and on
the 2-process cloud process 0's mean seconds per broadcast call (its Prometheus gauges,
scraped before and after each run): the rest of the step's extra time is the collectives
inside the jitted step. The expert bytes each process holds come from the processes' own
report (their startup log).

Run: ``python -m ec2moe_jax.bench.distributed`` (``--help``; about 10 minutes here with the
small config's random parameters).
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import os
import re
import signal
import statistics
import subprocess
import sys
import tempfile
import time

CLIENTS = (1, 4, 16)
_BYTES = re.compile(r"expert weights: ([\d,]+) of ([\d,]+) bytes on this process "
                    r"\(([\d,]+) with replicas")


def _cloud(workdir: str, processes: int, devices: int, tmp: str, cache_len: int,
           slots: int, prompt_len: int):
    """Starts ``ec2moe serve`` (``processes`` > 1: its local launcher) with cloud-only
    sessions compiled for every batch size; returns (process, port, log path)."""
    tag = f"p{processes}"
    ready, log = os.path.join(tmp, f"{tag}.port"), os.path.join(tmp, f"{tag}.log")
    cmd = [sys.executable, "-m", "ec2moe_jax", "serve", "--workdir", workdir, "--port", "0",
           "--slots", str(slots), "--devices", str(devices), "--cache-len", str(cache_len),
           "--warm", "0:bf16", "--warm-prompt", str(prompt_len), "--ready-file", ready,
           "--num-processes", str(processes), "--metrics-port", "0"]
    with open(log, "w") as f:
        proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=f,
                                start_new_session=True)
    deadline = time.monotonic() + 1200
    while not os.path.exists(ready):
        if proc.poll() is not None or time.monotonic() > deadline:
            _stop(proc)
            raise RuntimeError(f"the {processes}-process cloud did not start: see {log}")
        time.sleep(0.5)
    with open(ready) as f:
        return proc, int(f.read()), log


def _metrics(log: str) -> dict[str, float]:
    """Process 0's Prometheus gauges and counters (name -> value; its port from its log)."""
    import urllib.request

    with open(log) as f:
        port = re.findall(r"metrics on :(\d+)", f.read())[-1]
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as r:
        text = r.read().decode()
    return {k: float(v) for k, v in re.findall(r"^(ec2moe_\w+) ([-\d.e+]+)$", text, re.M)}


def _broadcast(before: dict, after: dict) -> dict:
    """Process 0's broadcasts between two scrapes: calls and mean seconds per call."""
    calls = after.get("ec2moe_broadcast_calls", 0) - before.get("ec2moe_broadcast_calls", 0)
    secs = after.get("ec2moe_broadcast_seconds", 0) - before.get("ec2moe_broadcast_seconds", 0)
    return {"broadcast_calls": int(calls), "broadcast_s_per_call": secs / calls if calls else None}


def _stop(proc) -> None:
    if proc.poll() is None:
        proc.terminate()
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(30)
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGKILL)  # a launcher's children too
    proc.wait(10)


def expert_bytes_from_log(path: str) -> list[dict]:
    """The expert bytes each process reported at startup (``distinct``: the expert slices
    it holds once; ``held``: with replicas over its devices; ``total``: the model's)."""
    with open(path) as f:
        found = _BYTES.findall(f.read())
    return [{"distinct": int(a.replace(",", "")), "total": int(b.replace(",", "")),
             "held": int(c.replace(",", ""))} for a, b, c in found]


def _mesh(processes: int, devices: int) -> dict:
    """The cloud's mesh shape as ``launch.cloud_mesh`` builds it by default: 2 expert shards
    per process where its device count is even, else 1."""
    m = devices // processes
    e = (2 if m % 2 == 0 else 1) * processes
    return {"data": devices // e, "expert": e}


def _load() -> list[float]:
    return [round(x, 2) for x in os.getloadavg()]


def _median_row(runs: list[dict]) -> dict:
    keys = ("aggregate_decode_tokens_per_s", "aggregate_tokens_per_s",
            "server_step_s_median", "server_step_wall_s_median")
    out = {}
    for k in keys:
        xs = [r[k] for r in runs if r.get(k) is not None]
        out[k] = statistics.median(xs) if xs else None
    out["tpot_s_p50"] = statistics.median(r["tpot_s"]["p50"] for r in runs)
    occupancy = [r["server_batch_occupancy"] for r in runs
                 if r["server_batch_occupancy"] is not None]
    out["server_batch_occupancy"] = statistics.median(occupancy) if occupancy else None
    out["reconnects"] = sum(r["reconnects"] for r in runs)
    per_call = [r["broadcast_s_per_call"] for r in runs if r.get("broadcast_s_per_call")]
    if per_call:
        out["broadcast_s_per_call"] = statistics.median(per_call)
    return out


def run(workdir: str, *, clients=CLIENTS, tokens: int = 64, repeats: int = 3,
        devices: int = 2, out: str = "results/distributed.json", command: str = "") -> dict:
    """Measures both clouds (see the module docstring) and writes ``out``.

    Args:
      workdir: a trained (or random-parameter) workdir.
      clients: client process counts.
      tokens: new tokens per client and run.
      repeats: interleaved repeats per (cloud, clients); medians are reported.
      devices: devices of the cloud in all (the 2-process cloud has devices / 2 each).
    """
    import grpc

    from ec2moe_jax.bench.serving import PROMPT_LEN, _measure, _Pool
    from ec2moe_jax.files import write_json_atomic
    from ec2moe_jax.pipeline.plans import baseline
    from ec2moe_jax.serving.protocol import pb_grpc
    from ec2moe_jax.serving.relay import RelayThread, Shape
    from ec2moe_jax.training import load_run

    if devices % 2:
        raise ValueError(f"devices={devices} must be even (2 processes of devices / 2)")
    cfg = load_run(workdir, progress=False)[0].cfg.model
    # The pool's clients keep one connection per plan JSON: one plan name per cloud.
    plans = {p: dataclasses.replace(baseline("cloud-only", cfg), name=f"cloud-only-{p}proc")
             for p in (1, 2)}
    slots, cache_len = max(clients), PROMPT_LEN + tokens + 8
    load0, t0 = _load(), time.time()
    raw: dict = {1: {n: [] for n in clients}, 2: {n: [] for n in clients}}
    with tempfile.TemporaryDirectory() as tmp:
        clouds = {p: _cloud(workdir, p, devices // p, tmp, cache_len, slots, PROMPT_LEN)
                  for p in (1, 2)}
        pool = _Pool(max(clients), workdir)
        relays = {p: RelayThread(("127.0.0.1", port), Shape()) for p, (_, port, _) in
                  clouds.items()}  # no shaping: the relay only counts bytes here
        try:
            for rep in range(repeats):
                for n in clients:
                    for p in (1, 2) if rep % 2 == 0 else (2, 1):
                        m0 = _metrics(clouds[p][2])
                        with grpc.insecure_channel(f"127.0.0.1:{clouds[p][1]}") as ch:
                            r = _measure(pool, pb_grpc.CloudStub(ch), relays[p], n, plans[p],
                                         relays[p].address, tokens)
                        if p == 2:
                            r.update(_broadcast(m0, _metrics(clouds[p][2])))
                        raw[p][n].append(r)
                        print(f"repeat {rep} processes {p} clients {n}: "
                              f"{r['aggregate_tokens_per_s']:.0f} tokens/s, step "
                              f"{r['server_step_s_median'] * 1e3:.2f} ms", file=sys.stderr,
                              flush=True)
            bytes_per_process = {p: expert_bytes_from_log(clouds[p][2]) for p in (1, 2)}
        finally:
            pool.close()
            for relay in relays.values():
                relay.close()
            for proc, _, _ in clouds.values():
                _stop(proc)
    result = _summary(raw, clients, tokens, repeats, devices, bytes_per_process, workdir,
                      command, load0, _load(), time.time() - t0, PROMPT_LEN)
    write_json_atomic(out, result)
    return result


def _summary(raw, clients, tokens, repeats, devices, bytes_per_process, workdir, command,
             load0, load1, seconds, prompt_len) -> dict:
    rows = []
    for n in clients:
        one, two = _median_row(raw[1][n]), _median_row(raw[2][n])
        ratio = (two["aggregate_tokens_per_s"] / one["aggregate_tokens_per_s"]
                 if one["aggregate_tokens_per_s"] else None)
        rows.append({"clients": n, "one_process": one, "two_processes": two,
                     "tokens_per_s_ratio_two_over_one": ratio,
                     "runs": {"one_process": raw[1][n], "two_processes": raw[2][n]}})
    return {
        "method": (f"measured on this CPU ({os.cpu_count()} cores, shared by both clouds, "
                   f"{max(clients)} client processes and the relay; load average "
                   f"{load0} before, {load1} after): real ec2moe serve processes, gRPC over "
                   "loopback TCP, cloud-only sessions (the server feeds its own samples), "
                   f"{tokens} new tokens per client after a {prompt_len}-token prompt; medians of "
                   f"{repeats} interleaved repeats. The 2-process cloud (jax.distributed, "
                   "gloo collectives over loopback) has the same ('data', 'expert') mesh "
                   "as the 1-process one; on 2 cores it cannot add compute, so the "
                   "difference is the overhead of the distributed step, not a scaling "
                   "result."),
        "command": command, "workdir": workdir, "devices_in_all": devices,
        "mesh": {"one_process": _mesh(1, devices), "two_processes": _mesh(2, devices)},
        "expert_bytes_per_process": {"one_process": bytes_per_process[1],
                                     "two_processes": bytes_per_process[2]},
        "rows": rows, "seconds": round(seconds, 1),
    }


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m ec2moe_jax.bench.distributed",
                                description=__doc__.split("\n\n")[0])
    p.add_argument("--workdir", default=None,
                   help="a workdir (default: the small config with random parameters in "
                        "runs/serving-small, as ec2moe bench-serving --random-init small)")
    p.add_argument("--clients", default=",".join(map(str, CLIENTS)))
    p.add_argument("--tokens", type=int, default=64)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--devices", type=int, default=2)
    p.add_argument("--out", default="results/distributed.json")
    args = p.parse_args(argv)
    from ec2moe_jax.bench.serving import random_workdir

    workdir = args.workdir or random_workdir("small", os.path.join("runs", "serving-small"))
    command = "python -m ec2moe_jax.bench.distributed " + " ".join(
        sys.argv[1:] if argv is None else argv)
    run(workdir, clients=[int(c) for c in args.clients.split(",")], tokens=args.tokens,
        repeats=args.repeats, devices=args.devices, out=args.out, command=command.strip())


if __name__ == "__main__":
    main()
