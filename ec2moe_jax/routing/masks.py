"""Resident-expert masks: which experts of a layer an end device keeps (pure).

Shape legend: L layers (any leading shape), E experts.

The one definition of "the top-n experts by routing mass" that the scheduler's plans
(counts per layer), the pipeline's routing masks and hardware-aware selection share: rank the
experts of each layer by descending frequency, ties broken by the lower expert index, and keep
ranks below n. NumPy in, NumPy out (float64, exact: plans realised outside jit); a jax array
or tracer in, a jax array out (jit-able, so a new mask or new statistics never recompile).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np


def _xp(x):
    return jnp if isinstance(x, jax.Array) else np


def expert_rank(frequencies) -> np.ndarray | jax.Array:
    """<int32>[..., E] rank of each expert within its row: 0 for the most-used, ties by the
    lower expert index (a stable sort).

    Args:
      frequencies: <float>[..., E] routing counts or frequencies (any non-negative scale).
    """
    # argsort of a stable argsort turns "expert at each rank" into "rank of each expert".
    if _xp(frequencies) is jnp:
        order = jnp.argsort(-frequencies, axis=-1, stable=True)
        return jnp.argsort(order, axis=-1, stable=True).astype(jnp.int32)
    # kind="stable": numpy < 2 (allowed by the project) has no ``stable`` argument.
    order = np.argsort(-np.asarray(frequencies), axis=-1, kind="stable")
    return np.argsort(order, axis=-1, kind="stable").astype(np.int32)


def top_n_mask(frequencies, n) -> np.ndarray | jax.Array:
    """<bool>[..., L, E] the ``n[..., l]`` most-used experts of each layer ``l``.

    Args:
      frequencies: <float>[L, E] (or [..., L, E]) routing counts or frequencies.
      n: <int>[..., L] experts to keep per layer (0..E), broadcast against the layers; e.g.
        a scheduler plan's ``resident`` [N, L] gives masks [N, L, E].
    """
    xp = _xp(frequencies) if not isinstance(n, jax.Array) else jnp
    return expert_rank(xp.asarray(frequencies)) < xp.asarray(n)[..., None]
