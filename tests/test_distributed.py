"""A cloud of 2 processes x 4 fake CPU devices on jax.distributed (loopback), started once
for the module by ``ec2moe serve --num-processes 2`` (its local launcher), every process
bounded by timeouts and killed at the end (the launcher runs in a session of its own, so its
whole process group goes). The tiny config (2 layers, 8 experts) with random parameters; the
cloud's expert axis is 4 wide across the 2 processes, so each holds half the experts."""

import contextlib
import json
import os
import pathlib
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

pytestmark = pytest.mark.timeout(240)
PROMPT = [72, 101, 108, 108, 111, 44, 32, 119]  # 8 tokens
NEW = 10


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """A tiny workdir with random parameters and ``load_run`` of it."""
    from conftest import random_workdir

    from ec2moe_jax.training import load_run

    wd = random_workdir(str(tmp_path_factory.mktemp("distributed") / "run"))[0]
    return wd, load_run(wd, progress=False)


class Cloud:
    """``ec2moe serve --num-processes 2 --devices 4`` (the launcher and its 2 processes)."""

    def __init__(self, workdir: str):
        base = pathlib.Path(workdir).parent
        self.ready, self.status = base / "ready", base / "status.json"
        self.log_path = base / "cloud.log"
        self.log = open(self.log_path, "w")  # noqa: SIM115 (closed in stop)
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "ec2moe_jax", "serve", "--workdir", workdir, "--port", "0",
             "--devices", "4", "--num-processes", "2", "--slots", "4", "--ttl", "20",
             "--ready-file", str(self.ready), "--launcher-status", str(self.status)],
            stdout=subprocess.DEVNULL, stderr=self.log, start_new_session=True,
            env={**os.environ, "JAX_PLATFORMS": "cpu"})
        self.wait(lambda s: s.get("state") == "serving", 120)
        self.address = f"127.0.0.1:{int(self.ready.read_text())}"

    def state(self) -> dict:
        try:
            return json.loads(self.status.read_text())
        except (OSError, ValueError):
            return {}

    def wait(self, ok, within_s: float) -> dict:
        deadline = time.monotonic() + within_s
        while not ok(s := self.state()):
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"cloud state {s}: {self.output()}")
            time.sleep(0.1)
        return s

    def output(self) -> str:
        self.log.flush()
        lines = self.log_path.read_text().splitlines()
        return "\n".join(x for x in lines if "[Gloo]" not in x)[-3000:]

    def pids(self) -> list[int]:
        """The cloud processes' pids (the launcher's children), process 0 first."""
        out = subprocess.run(["pgrep", "-P", str(self.proc.pid), "-a"], capture_output=True,
                             text=True).stdout.splitlines()
        ids = {int(x.split("--process-id ")[1].split()[0]): int(x.split()[0]) for x in out
               if "--process-id" in x}
        return [ids[i] for i in sorted(ids)]

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()  # the launcher stops process 0, which stops the others
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.proc.wait(20)
        with contextlib.suppress(ProcessLookupError):  # whatever is left of the group
            os.killpg(self.proc.pid, signal.SIGKILL)
        self.proc.wait(10)
        self.log.close()


@pytest.fixture(scope="module")
def cloud(run):
    c = Cloud(run[0])
    yield c
    c.stop()


def _plan(run, split: int):
    from ec2moe_jax.pipeline.plans import PipelinePlan

    cfg = run[1][0].cfg.model
    return PipelinePlan("test", split, (cfg.moe.num_experts,) * cfg.num_layers, "fp32")


def _client(run, address: str, split: int, **kw):
    from ec2moe_jax.serving.client import connect

    c = connect(address, run[0], _plan(run, split), run=run[1], timeout_s=60, **kw)
    c.warm_up(len(PROMPT))
    return c


_REFERENCE: list = []


def _reference(run) -> list[int]:
    """Greedy tokens of the in-process split-1 pipeline (both submeshes in this process)."""
    if not _REFERENCE:
        from ec2moe_jax.pipeline import Channel, executor, runtime
        from ec2moe_jax.profiles import link
        from ec2moe_jax.sharding import split_end_cloud

        wd, (setup, params, splits, freq) = run
        end, cloud = split_end_cloud(setup.cfg.mesh)
        stages, _ = runtime.prepare(setup.model, params, _plan(run, 1), end, cloud,
                                    frequencies=freq, workdir=wd)
        out, _ = executor.generate(stages, np.asarray([PROMPT]), NEW,
                                   channel=Channel.from_profile(link("wifi")))
        _REFERENCE.append(out[0].tolist())
    return _REFERENCE[0]


@pytest.mark.slow  # the three share the cloud: 40-50 s in all here
def test_two_processes_score_as_one_process_of_eight_devices(run, cloud, devices):
    # The same scoring requests through the 2 x 4 cloud (gRPC, experts split across the
    # processes) and through the server's worker on one process's 8 devices ('data' 4 x
    # 'expert' 2). Only the order of the expert reductions differs: fp32 tolerance of
    # conftest (rtol = atol = 1e-5 on CPU).
    from conftest import assert_close

    from ec2moe_jax.pipeline.stages import place_params
    from ec2moe_jax.serving.launch import cloud_mesh
    from ec2moe_jax.serving.worker import CloudWorker

    setup, params = run[1][0], run[1][1]
    mesh = cloud_mesh(8)
    assert mesh.shape == {"data": 4, "expert": 2}
    worker = CloudWorker(setup.model, place_params(setup.model, params, mesh), mesh, slots=4,
                         codec_for=lambda split, spec: None)
    rng = np.random.default_rng(0)
    rows = rng.integers(0, setup.model.cfg.vocab_size, (4, 17)).astype(np.int32)
    with _client(run, cloud.address, 0) as c:
        got = c.score(rows)
    want, _ = worker.score((0, "bf16", 0.0), rows[:, :-1], rows[:, 1:])
    assert got.shape == want.shape == (4, 16)
    assert_close(got, want)


@pytest.mark.slow  # the three share the cloud: 40-50 s in all here
def test_a_client_through_the_two_process_cloud_equals_the_in_process_pipeline(run, cloud):
    with _client(run, cloud.address, 1) as c:  # hidden states up, layer 1 across processes
        assert c.generate(PROMPT, NEW) == _reference(run)
        assert c.stats.reconnects == 0


@pytest.mark.slow  # the three share the cloud: 40-50 s in all here
def test_killing_one_cloud_process_restarts_the_cloud_and_the_client_replays(run, cloud):
    from ec2moe_jax.serving.client import Retry

    ref = _reference(run)
    before = cloud.state()["restarts"]
    tokens, killed = [], []

    def on_token(token):
        tokens.append(token)
        if len(tokens) == 3:  # mid-generation: the next step needs both processes
            pid = cloud.pids()[1]  # a follower: process 0 then blocks in its broadcast
            os.kill(pid, signal.SIGKILL)
            killed.append(pid)

    with _client(run, cloud.address, 1,
                 retry=Retry(first_s=0.1, max_s=1.0, budget_s=120)) as c:
        out = c.generate(PROMPT, NEW, on_token)
    assert killed and out == ref
    assert c.stats.reconnects >= 1, c.stats.events
    s = cloud.wait(lambda s: s.get("state") == "serving" and s["restarts"] > before, 30)
    assert s["exits"][-1]["process"] == 1 and s["exits"][-1]["returncode"] == -9
    assert len(s["outages_s"]) == s["restarts"] and s["outages_s"][-1] > 0
    assert f"restarted {s['restarts']} time(s)" in cloud.output()


def test_the_launcher_gives_up_on_a_cloud_that_never_serves(tmp_path):
    # Both processes fail at once (no model in the workdir): after max_failed_starts starts
    # that never served, run() returns 1 and the status file says so.
    from ec2moe_jax.serving.distributed import Launcher

    status = tmp_path / "status.json"
    launcher = Launcher(["--workdir", str(tmp_path / "missing"), "--devices", "1"], 2,
                        status_file=str(status), max_failed_starts=1)
    assert launcher.run() == 1
    s = json.loads(status.read_text())
    assert s["state"] == "failed" and s["restarts"] == 0 and s["exits"]
    assert s["exits"][0]["returncode"] != 0 and s["outages_s"] == []


def test_a_process_id_outside_the_cloud_is_refused_naming_the_flags():
    from ec2moe_jax.serving.distributed import initialize

    with pytest.raises(ValueError, match=r"--process-id 2 must lie in \[0, --num-processes 2"):
        initialize("127.0.0.1:1234", 2, 2)
    with pytest.raises(ValueError, match="--coordinator 'localhost' must be HOST:PORT"):
        initialize("localhost", 2, 0)


def test_the_global_mesh_puts_each_process_on_its_own_expert_slices(devices):
    # In one process the layout rule still holds: 'data' rows inside the process, the
    # expert axis over (processes x e); with 8 devices and 4 expert shards, data 2.
    from ec2moe_jax.serving.distributed import expert_bytes, global_cloud_mesh

    mesh = global_cloud_mesh(4)
    assert mesh.shape == {"data": 2, "expert": 4}
    assert [d.id for d in mesh.devices.flat] == [d.id for d in jax.devices()]
    with pytest.raises(ValueError, match="--expert-shards 3 must be 1 processes x a divisor"):
        global_cloud_mesh(3)
    w = jax.device_put(np.zeros((8, 4), np.float32),
                       jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("expert")))
    # 4 distinct quarters of 32 bytes, each held twice (the 2 'data' rows).
    assert expert_bytes({"w": w}) == {"total": 128, "held": 256, "distinct": 128}
