"""Hardware-aware local expert selection: which experts an end device keeps resident.

Shape legend: L layers, M MoE layers, E experts.

EC2MoE's HL-GGN filters the experts an end device may route to from its live profile
(*ours*: memory decides how many experts fit, compute decides how many layers run on the
end) and real routing statistics (the experts covering the most routing mass are kept).

Every end MoE layer first receives its ``min_per_layer`` most-used experts, then the
remaining slots go to the most-used (layer, expert) pairs overall. Because each layer's
frequencies sum to 1, taking the globally largest frequencies maximises the total routing
mass covered for a given number of equal-sized expert slots (an exchange argument), and the
result for ``n`` slots is a prefix of the result for ``n + 1``: more memory never covers less.

Fallback (documented): a profile that cannot hold the end layers' fixed weights plus
``min_per_layer`` experts in each gets an empty selection (``num_end_layers == 0``, every
layer in the cloud) and a ``reason``; a malformed profile fails when it is constructed.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

from ec2moe_jax.models.costs import ModelCosts
from ec2moe_jax.profiles import DeviceProfile
from ec2moe_jax.routing.masks import expert_rank


def selection_order(frequencies: jax.Array, min_per_layer: int = 1) -> jax.Array:
    """<int32>[M, E] rank of each (layer, expert) in the order slots are handed out.

    Args:
      frequencies: <float>[M, E] routing-mass share of each expert (rows sum to 1).
      min_per_layer: experts every layer receives before any layer gets more.
    """
    m, e = frequencies.shape
    freq = jnp.asarray(frequencies, jnp.float32)
    within = expert_rank(freq)  # the top-n order of every resident mask
    # Guaranteed slots outrank every frequency (all lie in [0, 1]).
    priority = freq + 2.0 * (within < min_per_layer)
    flat = jnp.argsort(-priority.reshape(-1), stable=True)
    return jnp.argsort(flat, stable=True).reshape(m, e).astype(jnp.int32)


def select_experts(frequencies: jax.Array, slots: jax.Array | int,
                   min_per_layer: int = 1) -> jax.Array:
    """<bool>[M, E] the ``slots`` experts to keep resident (pure, jit-able; ``slots`` may be
    traced, so new budgets do not recompile)."""
    return selection_order(frequencies, min_per_layer) < slots


def covered_mass(frequencies: jax.Array, allowed: jax.Array) -> jax.Array:
    """<float32>[M] share of each layer's routing mass that falls on allowed experts."""
    freq = jnp.asarray(frequencies, jnp.float32)
    return jnp.sum(freq * allowed, -1) / jnp.maximum(freq.sum(-1), 1e-30)


@dataclasses.dataclass(frozen=True)
class Selection:
    """Resident experts of one end device.

    Attributes:
      allowed: <bool>[L, E] per layer, the experts tokens may route to: the resident ones
        in end MoE layers, all of them in cloud layers (the cloud holds every expert) and in
        dense layers; pass it as the LM's ``allowed`` to run the split model's routing.
      num_end_layers: layers ``[0, num_end_layers)`` run on the end (0: everything in the
        cloud, the documented fallback).
      coverage: <float32>[L] routing mass covered per layer (1 outside end MoE layers).
      expert_slots: experts that fit in the device's memory after the fixed weights.
      resident_bytes: weights the end holds (embedding, fixed parts, resident experts).
      resident_fraction: resident experts over all experts of the end MoE layers (0 when
        the end runs none).
      reason: why the selection fell back, or "".
    """

    allowed: np.ndarray
    num_end_layers: int
    coverage: np.ndarray
    expert_slots: int
    resident_bytes: float
    resident_fraction: float
    reason: str = ""


def layers_within_budget(profile: DeviceProfile, costs: ModelCosts, seconds_per_token: float,
                         context: float = 0.0) -> int:
    """How many leading layers the device runs per token within ``seconds_per_token``.

    A roofline per layer: ``max(FLOPs / available FLOP/s, bytes read / available bandwidth)``
    for one token (decode reads each weight it uses once), so a loaded device runs fewer.
    """
    if seconds_per_token <= 0:
        raise ValueError(f"{seconds_per_token=} must be > 0")
    t = np.maximum(costs.layer_flops(context) / profile.available_flops,
                   costs.bytes_touched_per_token() / profile.available_bandwidth)
    return int(np.searchsorted(np.cumsum(t), seconds_per_token, side="right"))


def select_for_profile(
    profile: DeviceProfile,
    frequencies: np.ndarray,
    costs: ModelCosts,
    *,
    num_end_layers: int | None = None,
    seconds_per_token: float | None = None,
    min_per_layer: int | None = None,
    reserve_bytes: float = 0.0,
) -> Selection:
    """Resident experts for ``profile`` from routing ``frequencies`` [M, E] (MoE layers).

    Args:
      num_end_layers: layers the end runs (fallback if they do not fit); default: the most
        leading layers that fit memory and ``seconds_per_token``.
      seconds_per_token: compute budget per token (see :func:`layers_within_budget`).
      min_per_layer: experts each end MoE layer must keep (default top_k, so plain top-k
        routing stays possible).
      reserve_bytes: memory kept back for activations and the KV cache.

    Returns:
      A :class:`Selection`; the fallback (everything in the cloud) when nothing fits.
    """
    frequencies = np.asarray(frequencies, np.float64)
    moe_rows = np.flatnonzero(costs.is_moe)
    if frequencies.shape != (moe_rows.size, costs.num_experts):
        raise ValueError(f"frequencies have shape {frequencies.shape}; the model has "
                         f"{moe_rows.size} MoE layers x {costs.num_experts} experts")
    if not np.all(np.isfinite(frequencies)) or np.any(frequencies < 0):
        raise ValueError("frequencies must be finite and >= 0")
    if np.any(frequencies.sum(-1) <= 0):
        raise ValueError("a layer has no routing statistics (all counts 0); collect routing "
                         "statistics on real text first (ec2moe_jax.models.routing_stats)")
    min_k = costs.top_k if min_per_layer is None else min_per_layer
    if not 1 <= min_k <= costs.num_experts:
        raise ValueError(f"min_per_layer={min_k} must lie in [1, {costs.num_experts}]")
    n_max = costs.num_layers if num_end_layers is None else num_end_layers
    if not 0 <= n_max <= costs.num_layers:
        raise ValueError(f"{num_end_layers=} outside [0, {costs.num_layers}]")
    if seconds_per_token is not None:
        n_max = min(n_max, layers_within_budget(profile, costs, seconds_per_token))

    def budget(n_end: int) -> tuple[float, int, np.ndarray]:
        end_moe = moe_rows[moe_rows < n_end]
        fixed = costs.embed_bytes + costs.fixed_bytes[:n_end].sum() + reserve_bytes
        if n_end == costs.num_layers:
            fixed += costs.head_bytes
        slots = int(max(profile.memory_bytes - fixed, 0.0) // costs.expert_bytes)
        return fixed, min(slots, end_moe.size * costs.num_experts), end_moe

    # An explicit layer count is honoured or refused; by default the deepest split that fits.
    candidates = [n_max] if num_end_layers is not None else range(n_max, 0, -1)
    n_end = 0
    for n in candidates:
        fixed, slots, end_moe = budget(n)
        if slots >= end_moe.size * min_k:
            n_end = n
            break
    if n_end == 0:
        shape = (costs.num_layers, costs.num_experts)
        if n_max == 0:
            reason = "no layer fits the compute budget"
        else:
            reason = (f"{profile.name}: {profile.memory_bytes / 2**20:.1f} MiB holds {slots} "
                      f"experts of {costs.expert_bytes / 2**20:.2f} MiB after "
                      f"{fixed / 2**20:.1f} MiB of fixed weights; {end_moe.size} end MoE "
                      f"layers need at least {min_k} each")
        return Selection(np.ones(shape, bool), 0, np.ones(shape[0], np.float32), 0, 0.0, 0.0,
                         reason)
    m_end = np.searchsorted(moe_rows, n_end)  # MoE layers among the end layers
    sub = np.asarray(select_experts(frequencies[:m_end], slots, min_k))
    allowed = np.ones((costs.num_layers, costs.num_experts), bool)
    allowed[end_moe] = sub
    coverage = np.ones(costs.num_layers, np.float32)
    coverage[end_moe] = np.asarray(covered_mass(frequencies[:m_end], sub))
    return Selection(allowed, n_end, coverage, slots,
                     float(fixed - reserve_bytes + sub.sum() * costs.expert_bytes),
                     float(sub.mean()) if sub.size else 0.0)


def mixed_precision(frequencies: np.ndarray, budget_bytes: float,
                    bytes_per_expert: dict[int, float], min_per_layer: int = 1) -> np.ndarray:
    """<int64>[M, E] bits to store each expert in (0: not stored) within ``budget_bytes``,
    from a ladder of formats ``bytes_per_expert`` {bits: bytes of one expert} (*ours*).

    Count first, then precision: as many experts as fit in the lowest format, handed out in
    :func:`selection_order` (each layer's ``min_per_layer`` most-used first, then by routing
    mass); once every expert fits, the most-used are upgraded one format at a time while the
    budget lasts. Measured on the small model (``results/quality_memory.json``), dropping an
    expert costs far more than storing it in fewer bits, hence count first.

    Raises:
      ValueError: an empty ladder, a non-positive size, or a negative budget.
    """
    levels = sorted(bytes_per_expert)
    if not levels or any(bytes_per_expert[b] <= 0 for b in levels) or budget_bytes < 0:
        raise ValueError(f"bytes_per_expert={bytes_per_expert} needs positive sizes and "
                         f"budget_bytes={budget_bytes} must be >= 0")
    freq = np.asarray(frequencies, np.float64)
    order = np.asarray(selection_order(jnp.asarray(freq), min_per_layer)).reshape(-1)
    ranked = np.argsort(order, kind="stable")  # flat (layer, expert) ids, hottest first
    bits = np.zeros(freq.size, np.int64)
    low = bytes_per_expert[levels[0]]
    stored = min(int(budget_bytes // low + 1e-9), freq.size)
    bits[ranked[:stored]] = levels[0]
    left = budget_bytes - stored * low
    for prev, level in zip(levels, levels[1:], strict=False):
        step = bytes_per_expert[level] - bytes_per_expert[prev]
        n = min(int(left // step + 1e-9), stored) if step > 0 else stored
        bits[ranked[:n]] = level
        left -= n * step
        if n < stored:
            break
    return bits.reshape(freq.shape)
