"""The threaded CPU matvec (ec2moe_jax/kernels): built, used where it should be, equal to
XLA's matmul, independent of its thread count, differentiable, and absent where it must be."""

import os
import subprocess
import sys
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ec2moe_jax import kernels
from ec2moe_jax.kernels import matvec
from ec2moe_jax.sharding import use_mesh

needs_compiler = pytest.mark.skipif(matvec._compiler() is None, reason="no C++ compiler")


@needs_compiler
def test_builds_and_registers_where_a_compiler_exists():
    assert jax.default_backend() == "cpu"
    assert kernels.available()


@needs_compiler
@pytest.mark.parametrize("k,n", [(1, 1), (3, 5), (4, 64), (5, 65), (512, 256), (513, 1000)])
def test_equals_the_matmul(k, n):
    rng = np.random.default_rng(k * 1000 + n)
    x = rng.standard_normal((1, k)).astype(np.float32)
    w = rng.standard_normal((k, n)).astype(np.float32)
    f = jax.jit(kernels.matmul)
    assert "ec2moe_matvec" in f.lower(x, w).as_text()  # the kernel, not XLA's dot
    want = x.astype(np.float64) @ w.astype(np.float64)
    np.testing.assert_allclose(np.asarray(f(x, w)), want, rtol=1e-5, atol=1e-5 * np.sqrt(k))
    # Leading unit dimensions of a [B, T, D] decode step keep their shape.
    y = np.asarray(jax.jit(kernels.matmul)(x.reshape(1, 1, k), w))
    assert y.shape == (1, 1, n)
    np.testing.assert_allclose(y[0], want, rtol=1e-5, atol=1e-5 * np.sqrt(k))


def test_other_products_stay_in_xla():
    w = jnp.ones((8, 4), jnp.float32)
    assert not kernels.uses_kernel(jnp.ones((2, 8), jnp.float32), w)  # two rows
    assert not kernels.uses_kernel(jnp.ones((2, 0), jnp.float32), jnp.ones((0, 4)))  # K = 0
    assert not kernels.uses_kernel(jnp.ones((1, 8), jnp.bfloat16), w.astype(jnp.bfloat16))
    assert not kernels.uses_kernel(jnp.ones((1, 8), jnp.float32), jnp.ones((2, 8, 4)))
    mesh = jax.make_mesh((2,), ("data",), devices=jax.devices()[:2])
    with use_mesh(mesh):  # XLA cannot partition a custom call: never on a mesh
        assert not kernels.uses_kernel(jnp.ones((1, 8), jnp.float32), w)
        text = jax.jit(kernels.matmul).lower(jnp.ones((1, 8)), w).as_text()
    assert "ec2moe_matvec" not in text


@needs_compiler
def test_gradient_and_vmap_equal_the_matmul():
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.standard_normal((1, 24)), jnp.float32)
    w = jnp.asarray(rng.standard_normal((24, 70)), jnp.float32)

    def loss(op, x, w):
        return jnp.sum(jnp.tanh(op(x, w)))

    got = jax.grad(lambda *a: loss(kernels.matmul, *a), argnums=(0, 1))(x, w)
    want = jax.grad(lambda *a: loss(jnp.matmul, *a), argnums=(0, 1))(x, w)
    for g, h in zip(got, want):
        np.testing.assert_allclose(g, h, rtol=1e-5, atol=1e-5)
    xs = jnp.asarray(rng.standard_normal((3, 1, 24)), jnp.float32)
    np.testing.assert_allclose(jax.vmap(kernels.matmul, (0, None))(xs, w), xs @ w,
                               rtol=1e-5, atol=1e-4)


_SCRIPT = """
import numpy as np, jax
from ec2moe_jax import kernels
rng = np.random.default_rng(1)
x = rng.standard_normal((1, 700)).astype(np.float32)
w = rng.standard_normal((700, 3000)).astype(np.float32)
print(kernels.available())
np.save({out!r}, np.asarray(jax.jit(kernels.matmul)(x, w)))
"""


@needs_compiler
@pytest.mark.timeout(300)
def test_result_does_not_depend_on_the_thread_count(tmp_path):
    outs = []
    for threads in ("1", "2", "3"):
        out = str(tmp_path / f"y{threads}.npy")
        env = {**os.environ, "EC2MOE_CPU_KERNEL_THREADS": threads, "JAX_NUM_CPU_DEVICES": "1"}
        done = subprocess.run([sys.executable, "-c", _SCRIPT.format(out=out)], env=env,
                              capture_output=True, text=True, timeout=240)
        assert done.returncode == 0, done.stderr
        assert done.stdout.split()[-1] == "True"
        outs.append(np.load(out))
    assert outs[0].tobytes() == outs[1].tobytes() == outs[2].tobytes()


@pytest.mark.timeout(300)
def test_switched_off_it_is_the_xla_matmul(tmp_path):
    out = str(tmp_path / "y.npy")
    env = {**os.environ, "EC2MOE_CPU_KERNELS": "0", "JAX_NUM_CPU_DEVICES": "1"}
    done = subprocess.run([sys.executable, "-c", _SCRIPT.format(out=out)], env=env,
                          capture_output=True, text=True, timeout=240)
    assert done.returncode == 0, done.stderr
    assert done.stdout.split()[-1] == "False"
    rng = np.random.default_rng(1)
    x = rng.standard_normal((1, 700)).astype(np.float32)
    w = rng.standard_normal((700, 3000)).astype(np.float32)
    np.testing.assert_allclose(np.load(out), x @ w, rtol=1e-4, atol=1e-3)


def test_a_failed_build_warns_and_falls_back(tmp_path, monkeypatch):
    monkeypatch.setenv(matvec.ENV_CACHE, str(tmp_path))
    monkeypatch.setattr(matvec, "_compiler", lambda: "/bin/false")
    matvec.available.cache_clear()
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            assert not matvec.available()
        message = str(caught[-1].message)
        assert "building the CPU matvec kernel failed" in message
        assert "/bin/false" in message and matvec.ENV_ENABLE in message
        assert list(tmp_path.iterdir()) == []  # no half-written library left behind
    finally:
        matvec.available.cache_clear()


@needs_compiler
def test_back_to_back_calls_from_several_threads_stay_correct():
    # Jobs follow each other within microseconds and callers race for the pool (the loser
    # runs alone): every result must still be its own product.
    import threading

    rng = np.random.default_rng(0)
    cases = []
    for k, n in [(1, 7), (64, 65), (512, 256), (300, 1000), (5, 129)]:
        x = rng.standard_normal((1, k)).astype(np.float32)
        w = rng.standard_normal((k, n)).astype(np.float32)
        cases.append((x, w, x.astype(np.float64) @ w.astype(np.float64)))
    f = jax.jit(kernels.matmul)
    wrong = []

    def loop(calls):
        for i in range(calls):
            x, w, want = cases[i % len(cases)]
            if not np.allclose(np.asarray(f(x, w)), want, rtol=1e-4, atol=1e-3):
                wrong.append(i)

    loop(500)
    threads = [threading.Thread(target=loop, args=(300,)) for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert wrong == []


@needs_compiler
@pytest.mark.timeout(300)
def test_a_damaged_cached_library_is_built_again(tmp_path):
    # In a fresh process: one process cannot register a second library under the target.
    lib = tmp_path / matvec.library_name(matvec._compiler())
    lib.write_bytes(b"not a shared library")  # e.g. what a full disk left behind
    out = str(tmp_path / "y.npy")
    env = {**os.environ, matvec.ENV_CACHE: str(tmp_path), "JAX_NUM_CPU_DEVICES": "1"}
    done = subprocess.run([sys.executable, "-W", "error::RuntimeWarning", "-c",
                           _SCRIPT.format(out=out)], env=env, capture_output=True, text=True,
                          timeout=240)
    assert done.returncode == 0, done.stderr  # -W error: no fallback warning
    assert done.stdout.split()[-1] == "True"
    assert lib.read_bytes() != b"not a shared library"
    assert lib.stat().st_mode & 0o755 == 0o755  # loadable by others sharing the cache
