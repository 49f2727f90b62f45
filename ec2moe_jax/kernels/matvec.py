"""A threaded one-row matmul for XLA:CPU decode steps (``matvec.cc``, through the XLA FFI).

A batch-1 decode step is a chain of matrix-vector products: every projection of every layer,
each chosen expert's SwiGLU (``[1, D]`` per choice in the decode-shaped dispatch) and the LM
head. XLA:CPU runs a product of that size on one core (seen in ``jax.profiler`` traces), so a
step reads its weights at one core's rate. :func:`matmul` sends one-row float32 products on a
CPU to ``matvec.cc``, which splits the output columns over a small thread pool (at most 4
threads, the cores this process may use) and sums every output in the same order whatever
the thread count. Everything else goes to ``jnp.matmul``: more rows (prefill, larger
batches: XLA's GEMM is multi-threaded), other dtypes, other backends, and traces on a mesh of
more than one device (XLA cannot partition a custom call; it would gather the weights).

The kernel is compiled once per machine with the system's C++ compiler (``$CXX``, ``c++``,
``g++`` or ``clang++``, against ``jax.ffi.include_dir()``) into
``$EC2MOE_KERNEL_CACHE`` (default ``~/.cache/ec2moe_jax/kernels``), keyed by the source, the
flags, the compiler, jaxlib's version and the CPU, written atomically (several processes may
build it at once). Without a compiler, or with ``EC2MOE_CPU_KERNELS=0``, :func:`matmul` is
``jnp.matmul`` (one warning says why). ``EC2MOE_CPU_KERNEL_THREADS`` sets the pool size.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import importlib.metadata
import math
import os
import platform
import shutil
import subprocess
import tempfile
import warnings
from pathlib import Path

import jax
import jax.numpy as jnp

TARGET = "ec2moe_matvec"
SOURCE = Path(__file__).with_name("matvec.cc")
ENV_ENABLE = "EC2MOE_CPU_KERNELS"  # "0": never build or use the kernel
ENV_CACHE = "EC2MOE_KERNEL_CACHE"
_FLAGS = ("-O3", "-std=c++17", "-shared", "-fPIC", "-pthread", "-w")
_NATIVE = ("-march=native",)  # retried without it where the compiler refuses it


def _cpu_model() -> str:
    """The CPU's model and instruction-set lines (``-march=native`` code depends on them)."""
    keep = ("model name", "flags", "Features", "CPU implementer", "CPU part", "isa")
    try:
        with open("/proc/cpuinfo") as f:
            return "".join(dict.fromkeys(line for line in f if line.startswith(keep)))
    except OSError:
        return platform.processor()


def _compiler() -> str | None:
    for name in (os.environ.get("CXX"), "c++", "g++", "clang++"):
        if name and shutil.which(name):
            return shutil.which(name)
    return None


def _jaxlib_version() -> str:
    try:
        return importlib.metadata.version("jaxlib")
    except importlib.metadata.PackageNotFoundError:
        return jax.__version__


def library_name(compiler: str) -> str:
    """The file name the kernel is built to: keyed by the source, the flags, the compiler,
    jaxlib's version and the CPU's model and instruction sets."""
    include = jax.ffi.include_dir()
    key = hashlib.sha256(b"\0".join(
        [SOURCE.read_bytes(), " ".join(_FLAGS + _NATIVE).encode(), compiler.encode(),
         include.encode(), _jaxlib_version().encode(), platform.machine().encode(),
         _cpu_model().encode()]
    )).hexdigest()[:16]
    return f"{TARGET}-{key}.so"


def _build(compiler: str, cache: Path, rebuild: bool = False) -> Path:
    """Compiles ``matvec.cc`` into ``cache`` (once per :func:`library_name`, or again with
    ``rebuild``) -> the shared library's path.

    Raises:
      RuntimeError: the compiler failed (its output is in the message).
    """
    include = jax.ffi.include_dir()
    lib = cache / library_name(compiler)
    if lib.exists() and not rebuild:
        return lib
    cache.mkdir(parents=True, exist_ok=True)
    errors = []
    for extra in (_NATIVE, ()):
        fd, tmp = tempfile.mkstemp(suffix=".so", dir=cache)
        os.close(fd)
        cmd = [compiler, *_FLAGS, *extra, f"-I{include}", str(SOURCE), "-o", tmp]
        done = subprocess.run(cmd, capture_output=True, text=True)
        if done.returncode == 0:
            os.chmod(tmp, 0o755)  # mkstemp made it 0600: others sharing the cache load it too
            os.replace(tmp, lib)  # atomic: a concurrent build writes the same bytes
            return lib
        os.unlink(tmp)
        errors.append(f"$ {' '.join(cmd)}\n{done.stderr.strip()[-2000:]}")
    raise RuntimeError("building the CPU matvec kernel failed:\n" + "\n".join(errors))


@functools.lru_cache(maxsize=None)
def available() -> bool:
    """Whether the kernel is built and registered with XLA (builds it on first call)."""
    if os.environ.get(ENV_ENABLE, "1") == "0":
        return False
    compiler = _compiler()
    if compiler is None:
        why, fix = "no C++ compiler found (tried $CXX, c++, g++, clang++)", "install one"
    else:
        fix = f"set {ENV_CACHE} to a writable folder"
        try:
            cache = Path(os.environ.get(ENV_CACHE) or
                         Path.home() / ".cache" / "ec2moe_jax" / "kernels").expanduser()
            lib = _build(compiler, cache)
            try:
                handle = ctypes.CDLL(str(lib))
            except OSError:  # a damaged file under our name (never loaded): build it again
                handle = ctypes.CDLL(str(_build(compiler, cache, rebuild=True)))
            jax.ffi.register_ffi_target(TARGET, jax.ffi.pycapsule(handle.Ec2moeMatvec),
                                        platform="cpu")
            return True
        except (OSError, RuntimeError, AttributeError) as err:  # AttributeError: no symbol
            why = f"{type(err).__name__}: {err}"
    warnings.warn(f"ec2moe_jax.kernels: {why}; batch-1 CPU decoding uses XLA's matmul "
                  f"(slower: one core per product). To use the kernel, {fix}; to silence "
                  f"this, set {ENV_ENABLE}=0.", RuntimeWarning, stacklevel=3)
    return False


@jax.custom_jvp
def _matvec(x: jax.Array, w: jax.Array) -> jax.Array:
    out = jax.ShapeDtypeStruct((*x.shape[:-1], w.shape[1]), jnp.float32)
    return jax.ffi.ffi_call(TARGET, out, vmap_method="sequential")(x, w)


@_matvec.defjvp
def _matvec_jvp(primals, tangents):  # differentiable like the matmul it replaces
    (x, w), (dx, dw) = primals, tangents
    return _matvec(x, w), jnp.matmul(dx, w) + jnp.matmul(x, dw)


def _manual(a: jax.Array) -> bool:
    """Whether ``a`` varies over a ``shard_map`` axis (the custom call's result would not)."""
    typeof = getattr(jax, "typeof", None)
    if typeof is None:
        return False
    t = typeof(a)
    m = getattr(t, "manual_axis_type", None)  # jax 0.10
    if m is not None:
        return bool(getattr(m, "varying", None) or getattr(m, "unreduced", None)
                    or getattr(m, "reduced", None))
    return bool(getattr(t, "vma", None))


def uses_kernel(x: jax.Array, w: jax.Array) -> bool:
    """Whether :func:`matmul` runs ``x @ w`` in the kernel (at trace time): one row of
    float32 against a float32 matrix, on a CPU, outside a mesh of several devices and
    outside ``shard_map``, with the kernel built."""
    from ec2moe_jax.sharding import active_mesh  # sharding imports nothing of ours back

    mesh = active_mesh()
    return (x.ndim >= 1 and w.ndim == 2 and math.prod(x.shape[:-1]) == 1
            and x.shape[-1] == w.shape[0] and x.dtype == w.dtype == jnp.float32
            and (mesh is None or mesh.size == 1) and not (_manual(x) or _manual(w))
            and jax.default_backend() == "cpu" and available())


def matmul(x: jax.Array, w: jax.Array) -> jax.Array:
    """``x [..., K] @ w [K, N] -> [..., N]`` (``jnp.matmul`` semantics): one-row float32
    products on a CPU (batch-1 decode steps) in the threaded kernel, all else in XLA."""
    if not uses_kernel(x, w):
        return jnp.matmul(x, w)
    return jax.lax.platform_dependent(x, w, cpu=_matvec, default=jnp.matmul)
