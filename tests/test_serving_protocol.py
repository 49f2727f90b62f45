"""The serving protocol without a model: the committed generated code matches the .proto,
boundary states survive the wire exactly in the dtypes the cloud stage takes, binding rules,
the shared-token check before any handler runs (an in-process server with a stand-in
worker), and the shaping relay's delay, rate cap and reset on real sockets."""

import asyncio
import os
import pathlib
import shutil
import socket
import threading
import time
import types

import grpc
import ml_dtypes
import numpy as np
import pytest

from ec2moe_jax.codec import CodecSpec, WireFormatError, wire
from ec2moe_jax.serving import protocol
from ec2moe_jax.serving.protocol import pb, pb_grpc
from ec2moe_jax.serving.relay import RelayThread, Shape
from ec2moe_jax.serving.server import CloudServer, ServeOptions

pytestmark = pytest.mark.timeout(120)
ROOT = pathlib.Path(__file__).resolve().parents[1]


def test_committed_generated_code_matches_the_proto(tmp_path):
    # The descriptor protoc builds from ec2moe.proto today equals the one compiled into the
    # committed ec2moe_pb2.py (regenerate with the command in the .proto's header).
    from google.protobuf import descriptor_pb2
    from grpc_tools import protoc

    out = tmp_path / "set.pb"
    rc = protoc.main(["protoc", f"-I{ROOT}", f"--descriptor_set_out={out}",
                      "ec2moe_jax/serving/ec2moe.proto"])
    assert rc == 0
    fresh = descriptor_pb2.FileDescriptorSet.FromString(out.read_bytes()).file[0]
    for message in fresh.message_type:  # the descriptor set adds json names; gencode omits them
        for field in message.field:
            field.ClearField("json_name")
    committed = descriptor_pb2.FileDescriptorProto.FromString(pb.DESCRIPTOR.serialized_pb)
    assert fresh == committed, "regenerate ec2moe_pb2*.py (command in ec2moe.proto)"


@pytest.mark.parametrize("name", ["bf16", "fp32", "int8-r4", "int4-r5", "fp32-r4", None])
def test_boundary_states_cross_the_wire_exactly(name):
    rng = np.random.default_rng(0)
    spec = None if name is None else CodecSpec.parse(name)
    b, t, d = 2, 3, 8
    if spec is None:
        state = rng.integers(0, 256, (b, t)).astype(np.int32)
    elif not spec.lowrank:
        dtype = ml_dtypes.bfloat16 if spec.kind == "bf16" else np.float32
        state = {"h": rng.normal(size=(b, t, d)).astype(dtype)}
    elif spec.quant_bits is None:
        state = {"z": rng.normal(size=(b, t, spec.rank)).astype(np.float32)}
    else:
        top = 127 if spec.kind == "int8" else 7
        state = {"q": rng.integers(-top, top + 1, (b, t, spec.rank)).astype(np.int8),
                 "scale": rng.uniform(0.1, 2, (b, t)).astype(np.float32)}
    buf = protocol.encode_state(state, spec)
    got = protocol.decode_state(buf, spec, d_model=d, vocab_size=256, batch=b, time=t,
                                limits=wire.DEFAULT_LIMITS)
    if spec is None:
        np.testing.assert_array_equal(got, state)
        assert got.dtype == np.int32
        return
    assert set(got) == set(state)
    for k in state:  # same values and the dtype the end stage produced
        assert got[k].dtype == state[k].dtype, k
        np.testing.assert_array_equal(np.asarray(got[k], np.float32),
                                      np.asarray(state[k], np.float32))


def test_decode_refuses_other_shapes_kinds_and_ids():
    ids = protocol.encode_state(np.array([[1, 300]], np.int32), None)
    kw = dict(d_model=8, batch=1, time=None, limits=wire.DEFAULT_LIMITS)
    with pytest.raises(WireFormatError, match="token id 300 outside the vocabulary"):
        protocol.decode_state(ids, None, vocab_size=256, **kw)
    int8 = CodecSpec.parse("int8-r4")
    with pytest.raises(WireFormatError, match="rank 1 does not match the expected rank 4"):
        protocol.decode_state(ids, int8, vocab_size=512, **kw)
    floats = protocol.encode_state({"z": np.ones((1, 2, 4), np.float32)},
                                   CodecSpec.parse("fp32-r4"))
    with pytest.raises(WireFormatError, match="payload kind float32 does not match the "
                                              "expected int8"):
        protocol.decode_state(floats, int8, vocab_size=256, **kw)
    step = protocol.encode_state({"q": np.ones((1, 2, 4), np.int8),
                                  "scale": np.ones((1, 2), np.float32)}, int8)
    with pytest.raises(WireFormatError, match="payload time 2 does not match the expected "
                                              "time 1"):
        protocol.decode_state(step, int8, vocab_size=256, **{**kw, "time": 1})
    with pytest.raises(WireFormatError, match="rank 4 does not match the expected rank 5"):
        protocol.decode_state(step, CodecSpec.parse("int8-r5"), vocab_size=256, **kw)


def test_binding_beyond_loopback_needs_a_flag_and_authentication():
    assert ServeOptions().host == "127.0.0.1"
    with pytest.raises(ValueError, match="binding '0.0.0.0' exposes the server.*--allow-remote"):
        ServeOptions(host="0.0.0.0")
    with pytest.raises(ValueError, match="needs authentication"):
        ServeOptions(host="0.0.0.0", allow_remote=True)
    with pytest.raises(ValueError, match="at least 16"):
        ServeOptions(host="0.0.0.0", allow_remote=True, token="short")
    ServeOptions(host="0.0.0.0", allow_remote=True, token="x" * 16)
    ServeOptions(host="127.0.0.2")  # all of 127/8 is loopback
    # The command refuses it before loading anything (the workdir does not even exist).
    from ec2moe_jax import cli

    with pytest.raises(ValueError, match="binding '10.1.2.3'"):
        cli.run(["serve", "--host", "10.1.2.3", "--workdir", "/nonexistent"])


def test_message_limit_fits_the_largest_request():
    limit = protocol.message_limit(d_model=32, max_seq_len=64, max_score_batch=4)
    request = pb.ScoreRequest(payload=b"x" * wire.payload_bytes("float32", 4, 64, 32),
                              targets=b"x" * wire.payload_bytes("int32", 4, 64, 1))
    assert request.ByteSize() < limit < 4 * 2**20  # sized from the model, not gRPC's 4 MiB
    assert protocol.token_matches(protocol.bearer("s" * 16), "s" * 16)
    assert not protocol.token_matches(protocol.bearer("t" * 16), "s" * 16)
    assert not protocol.token_matches((), "s" * 16)


class _Worker:
    """A stand-in for CloudWorker: the model's sizes, and a record of every call (none is
    expected while the token is wrong)."""

    def __init__(self):
        cfg = types.SimpleNamespace(num_layers=2, max_seq_len=64, d_model=32, vocab_size=256)
        self.model = types.SimpleNamespace(cfg=cfg)
        self.groups, self.calls, self.max_seq_len = {}, [], cfg.max_seq_len

    def __getattr__(self, name):
        if name in ("admit", "prefill", "step", "score", "release"):
            return lambda *a: self.calls.append(name)
        raise AttributeError(name)


@pytest.fixture(scope="module")
def token_server():
    token = "k" * 24
    server = CloudServer(_Worker(), "sha256:params", lambda s, c: "", ServeOptions(token=token))
    loop = asyncio.new_event_loop()
    ready, box = threading.Event(), {}

    def run():
        asyncio.set_event_loop(loop)
        box["grpc"], box["port"] = loop.run_until_complete(server.start())
        ready.set()
        loop.run_forever()

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    assert ready.wait(30)
    yield server, f"127.0.0.1:{box['port']}", token
    asyncio.run_coroutine_threadsafe(server.stop(box["grpc"], 0.1), loop).result(10)
    loop.call_soon_threadsafe(loop.stop)
    thread.join(10)


def test_a_wrong_token_is_refused_before_any_tensor_is_read(token_server):
    server, address, token = token_server
    garbage = b"EC2W" + bytes(range(200))  # would be a refused payload if it were decoded
    with grpc.insecure_channel(address) as ch:
        stub = pb_grpc.CloudStub(ch)
        for meta in ((), protocol.bearer("w" * 24)):
            for call in (lambda m: stub.Open(pb.OpenRequest(), metadata=m, timeout=10),
                         lambda m: stub.Prefill(pb.PrefillRequest(session="s", payload=garbage),
                                                metadata=m, timeout=10),
                         lambda m: list(stub.Decode(iter([pb.Step(payload=garbage)]),
                                                    metadata=m, timeout=10))):
                with pytest.raises(grpc.RpcError) as e:
                    call(meta)
                assert e.value.code() == grpc.StatusCode.UNAUTHENTICATED
                assert "shared token" in e.value.details()
        # Nothing reached a handler: no payload decoded or refused, no worker call.
        assert server.metrics.rejected._value.get() == 0 and server.worker.calls == []
        # The right token reaches the handler, which checks the checkpoint next.
        with pytest.raises(grpc.RpcError) as e:
            stub.Open(pb.OpenRequest(fingerprint="sha256:other"), timeout=10,
                      metadata=protocol.bearer(token))
        assert e.value.code() == grpc.StatusCode.FAILED_PRECONDITION
        assert "sha256:other" in e.value.details()
        # Health needs no token (probes carry none).
        from grpc_health.v1 import health_pb2, health_pb2_grpc

        reply = health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(),
                                                     timeout=10)
        assert reply.status == health_pb2.HealthCheckResponse.SERVING


@pytest.fixture(scope="module")
def echo():
    srv = socket.socket()
    srv.bind(("127.0.0.1", 0))
    srv.listen()

    def serve():
        while True:
            try:
                c, _ = srv.accept()
            except OSError:
                return

            def pump(c=c):
                try:
                    while data := c.recv(1 << 16):
                        c.sendall(data)
                except OSError:
                    pass
                c.close()

            threading.Thread(target=pump, daemon=True).start()

    threading.Thread(target=serve, daemon=True).start()
    yield srv.getsockname()[1]
    srv.close()


def _rtt(sock) -> float:
    t = time.perf_counter()
    sock.sendall(b"x")
    assert sock.recv(16) == b"x"
    return time.perf_counter() - t


def test_relay_delays_caps_and_resets(echo):
    with RelayThread(("127.0.0.1", echo), Shape(delay_s=0.03)) as relay:
        sock = socket.create_connection(("127.0.0.1", relay.port))
        rtt = min(_rtt(sock) for _ in range(3))
        assert 0.06 <= rtt < 0.06 + 0.05  # two one-way delays of 30 ms, plus overhead
        late = relay.lateness()  # 3 round trips: 6 chunks, each delivered after its arrival
        assert late["chunks"] == 6 and 0.0 <= late["late_s"] < 6 * 0.05, late
        # 4 Mbit/s each way: 200 kB up and echoed back down pipeline through two capped
        # links, so the transfer takes at least 200e3 * 8 / 4e6 = 0.4 s.
        relay.set_shape(Shape(rate_bps=4e6))
        n = 200_000
        t = time.perf_counter()
        threading.Thread(target=sock.sendall, args=(b"a" * n,), daemon=True).start()
        got = 0
        while got < n:
            got += len(sock.recv(1 << 16))
        took = time.perf_counter() - t
        assert 0.4 <= took < 0.4 * 1.5 + 0.1, took
        assert relay.bytes()["down"] >= n
        assert relay.reset() == 1  # the live connection is dropped with a reset
        sock.settimeout(5)
        with pytest.raises(OSError):
            sock.sendall(b"y")
            if not sock.recv(1):  # a FIN instead of a reset would read as b""
                raise ConnectionResetError("closed")
        again = socket.create_connection(("127.0.0.1", relay.port))  # still listening
        assert _rtt(again) < 1.0


@pytest.mark.skipif(os.geteuid() != 0 or shutil.which("tc") is None,
                    reason="needs root and iproute2 (ip netns, tc tbf)")
def test_relay_bandwidth_agrees_with_the_kernel_shaper():
    # One 1 MB TCP transfer at 8 Mbit/s through tc tbf (veth between two netns) and through
    # the relay: the relay counts payload bytes, tbf whole packets (TCP/IP headers, ~4%).
    from ec2moe_jax.bench.serving import link_crosscheck

    (row,) = link_crosscheck(rates_bps=(8e6,), nbytes=1_000_000)["rows"]
    assert 0.85 < row["tbf_bps"] / 8e6 <= 1.02
    assert 0.9 < row["relay_over_tbf"] < 1.15, row


@pytest.fixture(scope="module")
def live_planner():
    """The tiny model on a weak end device (0.1 GFLOP/s, 10 MB/s: about 1 s per 32-token
    request on its own) and a T4 as the cloud, over wifi: cloud-only is the scheduler's
    plan."""
    from ec2moe_jax.config import load_config
    from ec2moe_jax.models.costs import model_costs
    from ec2moe_jax.profiles import DeviceProfile, device, link
    from ec2moe_jax.scheduler import build_instance
    from ec2moe_jax.serving.replan import LivePlanner

    cfg = load_config("tiny").model
    weak = DeviceProfile("weak", memory_bytes=1e9, peak_flops=1e8, mem_bandwidth=1e7)
    freq = np.full((cfg.num_layers, cfg.moe.num_experts), 1.0)
    template = build_instance(model_costs(cfg), freq, [weak], device("t4"), [link("wifi")],
                              [0.05], prompt_tokens=16, gen_tokens=32)
    return cfg, template, LivePlanner(cfg, template)


def test_the_live_planner_keeps_its_plan_under_jitter_and_reacts_to_a_busy_server(
        live_planner):
    cfg, template, planner = live_planner
    assert planner.plan.split == 0  # cloud-only on a fast link with a weak end
    rtt, bps = float(template.rtt[0]), float(template.link_bps[0])
    for k in range(6):  # +-3% measured jitter: inside the hysteresis band, no new session
        j = 1 + 0.03 * (-1) ** k
        assert planner.update(rtt * j, bps / j, queue_s=0.0) is None
    assert planner.changes == 0
    # The server reports 0.2 s of queueing per step: every cloud job pays it (6.4 s per
    # request), so the plan moves the work to the end (a new plan: the client opens a new
    # session for it, or runs alone when the plan is end-only, as here).
    new = planner.update(rtt, bps, queue_s=0.2)
    assert new is not None and new.split == cfg.num_layers and planner.changes == 1
    assert planner.update(rtt, bps, queue_s=0.2) is None  # and stays there


def test_metrics_are_exported_for_prometheus():
    import urllib.request

    server = CloudServer(_Worker(), "sha256:params", lambda s, c: "",
                         ServeOptions(metrics_port=0))
    port = server.metrics.serve("127.0.0.1", 0)
    server.metrics.sessions.set(3)
    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10).read().decode()
    for name in ("ec2moe_queue", "ec2moe_sessions 3.0", "ec2moe_slots 8.0",
                 "ec2moe_step_seconds_bucket", "ec2moe_compilations_total"):
        assert name in text, name


@pytest.mark.skipif(shutil.which("openssl") is None, reason="needs the openssl command")
def test_tls_with_a_token(tmp_path):
    # A self-signed certificate for localhost: the client trusts it and carries the token.
    key, cert = tmp_path / "key.pem", tmp_path / "cert.pem"
    import subprocess

    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1",
                    "-subj", "/CN=localhost", "-addext", "subjectAltName=DNS:localhost",
                    "-keyout", str(key), "-out", str(cert)], check=True, capture_output=True)
    token = "t" * 20
    server = CloudServer(_Worker(), "sha256:params", lambda s, c: "",
                         ServeOptions(host="localhost", token=token,
                                      tls=(cert.read_bytes(), key.read_bytes())))
    loop = asyncio.new_event_loop()
    grpc_server, port = loop.run_until_complete(server.start())
    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()
    try:
        creds = grpc.ssl_channel_credentials(root_certificates=cert.read_bytes())
        with grpc.secure_channel(f"localhost:{port}", creds) as ch:
            stub = pb_grpc.CloudStub(ch)
            reply = stub.Stats(pb.StatsRequest(), timeout=10, metadata=protocol.bearer(token))
            assert reply.slots == 8
            with pytest.raises(grpc.RpcError) as e:
                stub.Stats(pb.StatsRequest(), timeout=10)
            assert e.value.code() == grpc.StatusCode.UNAUTHENTICATED
        with grpc.insecure_channel(f"localhost:{port}") as ch, pytest.raises(grpc.RpcError):
            pb_grpc.CloudStub(ch).Stats(pb.StatsRequest(), timeout=3,
                                        metadata=protocol.bearer(token))
    finally:
        asyncio.run_coroutine_threadsafe(server.stop(grpc_server, 0.1), loop).result(10)
        loop.call_soon_threadsafe(loop.stop)
        thread.join(10)
