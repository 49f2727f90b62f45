"""Dispatch paths on an accelerator (marked ``accelerator``: deselected in CI; run them on a
lent GPU/TPU with ``pytest -m accelerator tests/test_accelerator.py``; they also pass, slowly,
on a CPU). ``ragged`` (``jax.lax.ragged_dot``, the fast path on GPU/TPU), the decode-shaped
``gathered`` path and the prefill-shaped ``looped`` path against the one-hot ``einsum``
reference, in float32 and bfloat16, on the default backend's first device."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import assert_close

from ec2moe_jax.config import MoEConfig
from ec2moe_jax.layers import MoEBlock
from ec2moe_jax.models import unstack_experts

pytestmark = pytest.mark.accelerator

D, F, E, K = 128, 256, 16, 4


def _block(dtype):
    cfg = MoEConfig(num_experts=E, top_k=K, expert_dim=F, capacity_factor=None,
                    eval_capacity_factor=None, dispatch="einsum")
    x = jax.random.normal(jax.random.key(0), (4, 32, D))
    params = MoEBlock(cfg, dtype=dtype).init(jax.random.key(1), x)
    return cfg, x, params


@pytest.mark.parametrize("dtype, tol", [(jnp.float32, 1e-4), (jnp.bfloat16, 3e-2)])
def test_ragged_equals_einsum_on_the_device(dtype, tol):
    cfg, x, params = _block(dtype)
    device = jax.devices()[0]
    x, params = jax.device_put((x, params), device)
    ref, _ = jax.jit(MoEBlock(cfg, dtype=dtype).apply)(params, x)
    ragged = MoEBlock(dataclasses.replace(cfg, dispatch="ragged"), dtype=dtype)
    got, _ = jax.jit(ragged.apply)(params, x)
    assert got.dtype == ref.dtype
    assert_close(got.astype(jnp.float32), ref.astype(jnp.float32), atol=tol, rtol=tol)


@pytest.mark.parametrize("dtype, tol", [(jnp.float32, 1e-4), (jnp.bfloat16, 3e-2)])
def test_decode_and_prefill_paths_equal_einsum_on_the_device(dtype, tol):
    # A decode step of 2 rows (8 choices <= E / 2: the gathered path, stacked and per-expert
    # buffers) and a 16-token prompt (per-expert buffers: the looped path) give the outputs
    # of the einsum dispatch over all 128 tokens (dropless routing is per token).
    cfg, x, params = _block(dtype)
    device = jax.devices()[0]
    x, params = jax.device_put((x, params), device)
    split = {"params": unstack_experts(params["params"])}
    block = MoEBlock(cfg, dtype=dtype)
    ref, _ = jax.jit(block.apply)(params, x)
    ref = np.asarray(ref, np.float32)
    for rows, cols in ((slice(0, 2), slice(0, 1)), (slice(0, 1), slice(0, 16))):
        for p in (params, split):
            got, _ = jax.jit(block.apply)(p, x[rows, cols])
            assert_close(np.asarray(got, np.float32), ref[rows, cols], atol=tol, rtol=tol)
