"""End-cloud serving with real processes: an `ec2moe serve` process on 127.0.0.1 (a random
free port), end clients in this process or in their own, every process bounded by a timeout
and cleaned up. A 3-layer tiny model with random parameters (splits 0, 1 and L-1 = 2), a saved
int8 rank-8 codec at splits 1 and 2, 4 KV slots, a 3 s session TTL."""

import contextlib
import os
import pathlib
import signal
import socket
import subprocess
import sys
import threading
import time
import uuid

import google_crc32c
import grpc
import numpy as np
import pytest

from ec2moe_jax.codec import wire
from ec2moe_jax.serving.client import Retry, _History, connect
from ec2moe_jax.serving.protocol import pb, pb_grpc

pytestmark = pytest.mark.timeout(300)
SLOTS, TTL = 4, 3.0
PROMPT = [72, 101, 108, 108, 111, 44, 32, 119]  # 8 tokens
NEW = 12


@pytest.fixture(scope="module")
def run(tmp_path_factory, fixture_splits):
    """A workdir of the tiny config with 3 layers, random parameters and saved int8-r8
    codecs (PCA on fixture text) at splits 1 and 2; and ``load_run`` of it."""
    from conftest import random_workdir

    from ec2moe_jax.codec import lowrank
    from ec2moe_jax.models.lm import MoELM
    from ec2moe_jax.training import load_run
    from ec2moe_jax.training.checkpoint import save_tree
    from ec2moe_jax.training.codec import collect_hidden, default_codec_dir

    wd, cfg, params = random_workdir(str(tmp_path_factory.mktemp("serving") / "run"),
                                     model__num_layers=3)
    model = MoELM(cfg.model)
    for split in (1, 2):
        h = collect_hidden(model, params, fixture_splits.train, split, batches=1,
                           batch_size=8, seq_len=32)
        codec = lowrank.pca_init(h, 8)
        codec.pop("explained")
        save_tree(default_codec_dir(wd, split, 8, "int8"),
                  {k: np.asarray(v) for k, v in codec.items()})
    return wd, load_run(wd, progress=False)


class Server:
    """An `ec2moe serve` process; ``port=0`` picks a free one."""

    def __init__(self, workdir: str, port: int = 0, *extra: str):
        self.ready = pathlib.Path(workdir).parent / f"port-{uuid.uuid4().hex}"
        self.log = open(self.ready.with_suffix(".log"), "w")  # noqa: SIM115 (closed in stop)
        env = {**os.environ, "JAX_PLATFORMS": "cpu"}
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "ec2moe_jax", "serve", "--workdir", workdir, "--port",
             str(port), "--slots", str(SLOTS), "--ttl", str(TTL), "--devices", "2",
             "--ready-file", str(self.ready), *extra],
            stdout=subprocess.DEVNULL, stderr=self.log, env=env)
        deadline = time.monotonic() + 120
        while not self.ready.exists():
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"server did not start: {self.output()}")
            time.sleep(0.1)
        self.port = int(self.ready.read_text())
        self.address = f"127.0.0.1:{self.port}"

    def output(self) -> str:
        self.log.flush()
        return self.ready.with_suffix(".log").read_text()[-3000:]

    def kill(self) -> None:
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(10)
        self.ready.unlink(missing_ok=True)

    def stop(self) -> None:
        from conftest import stop_process

        stop_process(self.proc)
        self.log.close()


@pytest.fixture(scope="module")
def server(run):
    s = Server(run[0])
    yield s
    s.stop()


@pytest.fixture(scope="module")
def stub(server):
    with grpc.insecure_channel(server.address) as ch:
        yield pb_grpc.CloudStub(ch)


def _plan(run, split: int, codec: str):
    from ec2moe_jax.pipeline.plans import PipelinePlan

    cfg = run[1][0].cfg.model
    return PipelinePlan("test", split, (cfg.moe.num_experts,) * cfg.num_layers, codec)


_REFERENCES: dict = {}


def _reference(run, split: int, codec: str, prompt=PROMPT) -> list[int]:
    """Greedy tokens of the in-process pipeline (both submeshes in this process)."""
    key = (split, codec, tuple(prompt))
    if key not in _REFERENCES:
        from ec2moe_jax.pipeline import Channel, executor, runtime
        from ec2moe_jax.profiles import link
        from ec2moe_jax.sharding import split_end_cloud

        wd, (setup, params, splits, freq) = run
        end, cloud = split_end_cloud(setup.cfg.mesh)
        stages, _ = runtime.prepare(setup.model, params, _plan(run, split, codec), end, cloud,
                                    frequencies=freq, workdir=wd)
        out, _ = executor.generate(stages, np.asarray([prompt]), NEW,
                                   channel=Channel.from_profile(link("wifi")))
        _REFERENCES[key] = out[0].tolist()
    return _REFERENCES[key]


def _client(run, address: str, split: int, codec: str, **kw):
    c = connect(address, run[0], _plan(run, split, codec), run=run[1], timeout_s=60, **kw)
    c.warm_up(len(PROMPT))  # compiling the end's step mid-generation could outlast the TTL
    return c


def _wait_sessions(stub, n: int, within_s: float) -> float:
    """Seconds until the server holds ``n`` sessions (fails after ``within_s``)."""
    t0 = time.monotonic()
    while (live := stub.Stats(pb.StatsRequest(), timeout=10).sessions) != n:
        assert time.monotonic() - t0 < within_s, f"{live} sessions, expected {n}"
        time.sleep(0.1)
    return time.monotonic() - t0


@pytest.mark.slow
@pytest.mark.parametrize("split,codec", [(0, "fp32"), (1, "fp32"), (2, "fp32"),
                                         (1, "int8-r8"), (2, "int8-r8")])
def test_generation_over_grpc_equals_the_in_process_pipeline(run, server, split, codec):
    ref = _reference(run, split, codec)
    with _client(run, server.address, split, codec) as c:
        assert c.generate(PROMPT, NEW) == ref
        assert c.stats.reconnects == 0 and c.stats.bytes_up > 0


def test_a_new_request_of_a_seen_bucket_compiles_nothing(run, server, stub):
    with _client(run, server.address, 0, "fp32") as c:
        c.generate(PROMPT, NEW)  # compiles the group's prefill and batch-1 step
        before = stub.Stats(pb.StatsRequest(), timeout=10).compiled
        c.generate([5, 6, 7, 8, 9, 10], NEW)  # another prompt, same buckets
        assert stub.Stats(pb.StatsRequest(), timeout=10).compiled == before


def test_interleaved_clients_equal_each_alone_and_share_batches(run, server, stub):
    other = [33, 34, 35]  # another length: rows at different positions share one step
    alone = {"a": _reference(run, 0, "fp32"), "b": _reference(run, 0, "fp32", other),
             "c": _reference(run, 1, "int8-r8")}
    _wait_sessions(stub, 0, TTL + 3)
    steps0 = stub.Stats(pb.StatsRequest(), timeout=10).steps
    outs, errors = {}, []

    def go(name, split, codec, prompt):
        try:
            with _client(run, server.address, split, codec) as c:
                outs[name] = c.generate(prompt, NEW)
        except Exception as e:  # reported below
            errors.append(e)

    threads = [threading.Thread(target=go, args=a) for a in
               (("a", 0, "fp32", PROMPT), ("b", 0, "fp32", other), ("c", 1, "int8-r8", PROMPT))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert not errors and outs == alone
    stats = stub.Stats(pb.StatsRequest(), timeout=10)
    assert stats.steps - steps0 < 3 * (NEW - 1)  # some steps served two sessions at once


def test_slot_exhaustion_answers_resource_exhausted_and_a_retry_succeeds(run, server, stub):
    from ec2moe_jax.training.workdir import params_fingerprint

    request = pb.OpenRequest(plan=pb.Plan(split=0, codec="bf16"),
                             fingerprint=params_fingerprint(run[1][1]))
    _wait_sessions(stub, 0, TTL + 3)
    sessions = [stub.Open(request, timeout=30).session for _ in range(SLOTS)]
    with pytest.raises(grpc.RpcError) as e:
        stub.Open(request, timeout=30)
    assert e.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert f"all {SLOTS} KV slots are taken" in e.value.details()
    stub.Close(pb.CloseRequest(session=sessions.pop()), timeout=10)
    sessions.append(stub.Open(request, timeout=30).session)  # the retry gets the freed slot
    for s in sessions:
        stub.Close(pb.CloseRequest(session=s), timeout=10)
    _wait_sessions(stub, 0, 5)


_HOLDER = """
import sys, time, numpy as np, grpc
from ec2moe_jax.serving.protocol import pb, pb_grpc, encode_state
address, fingerprint, mode = sys.argv[1:4]
stub = pb_grpc.CloudStub(grpc.insecure_channel(address))
sid = stub.Open(pb.OpenRequest(plan=pb.Plan(split=0, codec="bf16"), fingerprint=fingerprint),
                timeout=60).session
stub.Prefill(pb.PrefillRequest(session=sid, payload=encode_state(np.array([[1, 2, 3]],
                                                                           np.int32), None)),
             timeout=60)
def steps():
    yield pb.Step(session=sid, tokens=1)
    time.sleep(600)
if mode == "stream":
    replies = stub.Decode(steps(), timeout=600)
    next(replies)
print("ready", flush=True)
time.sleep(600)
"""


def test_a_killed_client_frees_its_slot_and_others_continue(run, server, stub):
    from ec2moe_jax.training.workdir import params_fingerprint

    fp = params_fingerprint(run[1][1])
    _wait_sessions(stub, 0, TTL + 3)
    procs = []
    try:
        for mode in ("stream", "idle"):  # one inside a decode stream, one between calls
            p = subprocess.Popen([sys.executable, "-c", _HOLDER, server.address, fp, mode],
                                 stdout=subprocess.PIPE, text=True)
            procs.append(p)
            assert p.stdout.readline().strip() == "ready"
        _wait_sessions(stub, 2, 5)
        for p, left, within in ((procs[0], 1, TTL / 2), (procs[1], 0, TTL + 2)):
            # The stream's session goes with its connection (well within the TTL); the
            # idle one when its TTL runs out.
            p.kill()
            p.wait(10)
            _wait_sessions(stub, left, within)
        with _client(run, server.address, 0, "fp32") as c:  # the server serves on
            assert c.generate(PROMPT, NEW) == _reference(run, 0, "fp32")
    finally:
        for p in procs:
            with contextlib.suppress(ProcessLookupError):
                p.kill()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_server_restart_and_link_reset_mid_generation_replay_to_the_same_tokens(run):
    from ec2moe_jax.serving.relay import RelayThread, Shape

    ref = _reference(run, 1, "int8-r8")
    port = _free_port()
    servers = [Server(run[0], port)]
    # 15 ms each way: every token is a round trip, so the generation takes long enough to
    # be interrupted twice.
    relay = RelayThread(("127.0.0.1", port), Shape(delay_s=0.015))
    events = []

    def on_token(_):
        n = len(events) + 1
        events.append(n)
        if n == 3:  # the link drops: both ends see a reset connection
            relay.reset()
        if n == 6:  # the server dies and comes back on the same port
            servers[0].kill()
            servers.append(Server(run[0], port))

    try:
        with _client(run, relay.address, 1, "int8-r8",
                     retry=Retry(first_s=0.05, max_s=1.0, budget_s=120)) as c:
            out = c.generate(PROMPT, NEW, on_token)
            assert out == ref
            assert c.stats.reconnects >= 2, c.stats.events
    finally:
        relay.close()
        for s in servers:
            s.stop()


@pytest.mark.slow
def test_ten_thousand_malformed_payloads_get_errors_while_a_client_is_served(run, server,
                                                                            stub):
    from ec2moe_jax.training.workdir import params_fingerprint

    fp = params_fingerprint(run[1][1])
    with _client(run, server.address, 1, "int8-r8") as c:
        codec_fp = c.codec_fp
        h = _History(PROMPT)
        c._cover(h)
        good = c._encode(h)  # a valid [1, 8, 8] int8 prompt payload
    wire.unpack(good)
    request = pb.OpenRequest(plan=pb.Plan(split=1, codec="int8-r8"), fingerprint=fp,
                             codec_fingerprint=codec_fp)
    sid = stub.Open(request, timeout=30).session
    rng = np.random.default_rng(0)

    def bad(i: int) -> bytes:
        kind = i % 4
        if kind == 0:  # one flipped bit anywhere
            buf = bytearray(good)
            bit = int(rng.integers(8 * len(buf)))
            buf[bit // 8] ^= 1 << (bit % 8)
            return bytes(buf)
        if kind == 1:  # random bytes
            return rng.bytes(int(rng.integers(0, 200)))
        if kind == 2:  # truncated
            return good[: int(rng.integers(0, len(good)))]
        # a forged header (valid checksum) declaring enormous sizes
        head = wire.HEADER.pack(wire.MAGIC, wire.VERSION, 1, 8, 2**32 - 1,
                                int(rng.integers(0, 2**32)), 0, 0)[:20]
        return head + google_crc32c.value(head).to_bytes(4, "little")

    served, errors = [], []

    def well_formed():
        try:
            while len(served) < 3 and not errors:
                with _client(run, server.address, 0, "fp32") as c:
                    served.append(c.generate(PROMPT, NEW))
        except Exception as e:  # reported below
            errors.append(e)

    t = threading.Thread(target=well_formed)
    t.start()
    codes: dict = {}
    for start in range(0, 10_000, 250):
        futures = [stub.Prefill.future(pb.PrefillRequest(session=sid, payload=bad(i)),
                                       timeout=60) for i in range(start, start + 250)]
        for f in futures:
            code = f.code()
            codes[code] = codes.get(code, 0) + 1
    t.join(120)
    stub.Close(pb.CloseRequest(session=sid), timeout=10)
    assert set(codes) == {grpc.StatusCode.INVALID_ARGUMENT}, codes
    assert sum(codes.values()) == 10_000
    assert not errors and len(served) >= 1
    assert all(s == _reference(run, 0, "fp32") for s in served)


def test_plans_the_server_cannot_serve_are_refused_naming_the_value(run, server, stub):
    from ec2moe_jax.training.workdir import params_fingerprint

    fp = params_fingerprint(run[1][1])
    cases = [
        (pb.OpenRequest(plan=pb.Plan(split=3, codec="bf16"), fingerprint=fp),
         grpc.StatusCode.INVALID_ARGUMENT, "split=3 out of range"),
        (pb.OpenRequest(plan=pb.Plan(split=1, codec="int9-r8"), fingerprint=fp),
         grpc.StatusCode.INVALID_ARGUMENT, "unknown codec 'int9-r8'"),
        (pb.OpenRequest(plan=pb.Plan(split=0, codec="bf16"), fingerprint="sha256:00"),
         grpc.StatusCode.FAILED_PRECONDITION, "fingerprint 'sha256:00' differs"),
        (pb.OpenRequest(plan=pb.Plan(split=1, codec="int8-r8"), fingerprint=fp,
                        codec_fingerprint="sha256:11"),
         grpc.StatusCode.FAILED_PRECONDITION, "the client's weights 'sha256:11' differ"),
    ]
    for request, code, match in cases:
        with pytest.raises(grpc.RpcError) as e:
            stub.Open(request, timeout=60)
        assert e.value.code() == code and match in e.value.details(), e.value.details()
    with pytest.raises(ValueError, match="privacy mode refuses a cloud-only plan"):
        _client(run, server.address, 0, "fp32", privacy=True)


def test_a_plan_change_opens_a_new_session_and_replays(run, server, stub):
    # Split 1 (lossless fp32) for the first 4 tokens, then the client re-plans to cloud-only:
    # the old session is closed, a new one replays the history. Both plans are lossless, so
    # the tokens equal the unsplit model's (the cloud-only reference).
    from ec2moe_jax.pipeline import runtime
    from ec2moe_jax.sharding import split_end_cloud

    wd, (setup, params, splits, freq) = run
    end, _ = split_end_cloud(setup.cfg.mesh)
    cloud_only, _ = runtime.prepare(setup.model, params, _plan(run, 0, "fp32"), end, None,
                                    frequencies=freq, workdir=wd, side="end")
    sessions = []

    def replan(client):
        sessions.append(client.session)
        if len(sessions) == 1:
            client.switch(cloud_only, None)
            return True
        return False

    with _client(run, server.address, 1, "fp32") as c:
        out = c.generate(PROMPT, NEW, replan=replan, replan_every=4)
    assert out == _reference(run, 0, "fp32") == _reference(run, 1, "fp32")
    assert len(sessions) >= 2 and sessions[0] != sessions[1]
    _wait_sessions(stub, 0, 1.0)  # closed at the switch, not left to its 3 s TTL


def test_scoring_over_grpc_equals_the_in_process_pipeline(run, server):
    split, codec = 1, "int8-r8"  # the end's codec on the wire, the cloud's scores back
    from conftest import assert_close

    from ec2moe_jax.pipeline import Channel, executor, runtime
    from ec2moe_jax.profiles import link
    from ec2moe_jax.sharding import split_end_cloud

    wd, (setup, params, splits, freq) = run
    rows = np.asarray([PROMPT + [10, 20, 30], PROMPT[::-1] + [40, 50, 60]], np.int32)
    end, cloud = split_end_cloud(setup.cfg.mesh)
    stages, _ = runtime.prepare(setup.model, params, _plan(run, split, codec), end, cloud,
                                frequencies=freq, workdir=wd)
    ref, _ = executor.score(stages, rows, channel=Channel.from_profile(link("wifi")),
                            micro_batch=2)
    with _client(run, server.address, split, codec) as c:
        assert_close(c.score(rows), ref)
