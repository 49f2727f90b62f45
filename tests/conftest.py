"""Test setup: 8 fake CPU devices before JAX starts, shared fixtures, one tolerance helper."""

import os

os.environ.setdefault("JAX_NUM_CPU_DEVICES", "8")
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402

FIXTURES = os.path.join(os.path.dirname(__file__), "fixtures")


def tolerance(dtype="float32", backend: str | None = None) -> dict:
    """rtol/atol for comparing two implementations of the same maths."""
    backend = backend or jax.default_backend()
    if np.dtype(dtype) == np.dtype("bfloat16") or str(dtype) == "bfloat16":
        return {"rtol": 2e-2, "atol": 2e-2}
    # GPU/TPU matmuls may use TF32-like passes; CPU is exact-ish fp32.
    return {"rtol": 1e-5, "atol": 1e-5} if backend == "cpu" else {"rtol": 2e-3, "atol": 2e-3}


def assert_close(a, b, dtype="float32", **overrides):
    tol = {**tolerance(dtype), **overrides}
    np.testing.assert_allclose(np.asarray(a, np.float64), np.asarray(b, np.float64), **tol)


@pytest.fixture(scope="session")
def devices():
    devs = jax.devices()
    assert len(devs) >= 8, (
        f"tests need 8 devices, got {len(devs)}: set JAX_NUM_CPU_DEVICES=8 before importing jax"
    )
    return devs


@pytest.fixture(scope="session")
def tiny_pipeline(devices):
    """The tiny model, its parameters, the end and cloud meshes and its stages at splits 0, 1
    and 2 (lossless link, every expert), shared by the pipeline and validation tests."""
    from ec2moe_jax.config import load_config
    from ec2moe_jax.models.lm import MoELM, init_params
    from ec2moe_jax.pipeline import build_stages
    from ec2moe_jax.sharding import split_end_cloud, unbox

    cfg = load_config("tiny")
    model = MoELM(cfg.model)
    params = unbox(init_params(model, jax.random.key(0)))
    end, cloud = split_end_cloud(cfg.mesh, devices)
    stages = {s: build_stages(model, params, end, cloud, split=s) for s in (0, 1, 2)}
    return {"cfg": cfg, "model": model, "params": params, "end": end, "cloud": cloud,
            "stages": stages}


@pytest.fixture(scope="session")
def fixture_splits():
    """Tokenised splits of the committed text fixture (no network)."""
    from ec2moe_jax.config import DataConfig
    from ec2moe_jax.data import prepare_splits

    paths = ",".join(os.path.join(FIXTURES, "corpus", n) for n in ("a.txt", "b.txt"))
    return prepare_splits(DataConfig(source=paths, val_fraction=0.1, test_fraction=0.1))


def fixture_config(**overrides):
    """The tiny config on the committed text fixture (``overrides``: ``section__field``)."""
    from ec2moe_jax.config import load_config

    paths = ",".join(os.path.join(FIXTURES, "corpus", n) for n in ("a.txt", "b.txt"))
    return load_config("tiny").replace(data__source=paths, data__val_fraction=0.1,
                                       data__test_fraction=0.1, **overrides)


def random_workdir(path: str, **overrides):
    """A workdir at ``path`` of :func:`fixture_config` with random parameters (seed 0), as a
    server loads it; returns ``(path, config, params)``."""
    import jax

    from ec2moe_jax.models.lm import MoELM, init_params
    from ec2moe_jax.sharding import unbox
    from ec2moe_jax.training.loop import save_params

    cfg = fixture_config(**overrides)
    params = unbox(init_params(MoELM(cfg.model), jax.random.key(0)))
    save_params(cfg, path, params)
    return path, cfg, params


def stop_process(proc, wait_s: float = 10.0) -> None:
    """Stops a process a test started: SIGTERM, then SIGKILL if it outlives ``wait_s``."""
    import subprocess

    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(wait_s)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(10)


@pytest.fixture()
def tiny_cfg():
    return fixture_config()
