"""The per-device candidate set of the heuristic, and the baseline plans as candidates.

Shape legend: L layers, E experts, N end devices, S = L + 1 splits, R = 3 residency options,
C codec options, B micro-batch options, K = S R C B candidates per device.

Residency options per split (route-aware: always the most-used experts first):
  0 "cover": per end MoE layer the fewest experts covering ``min_coverage`` of its routing
    mass (at least top-k);
  1 "fit": as many experts as memory holds, handed out by
    :func:`ec2moe_jax.selection.selection_order` (top-k per layer first, then by mass),
    dropping the rest;
  2 "swap": "fit" less one slot (the swap buffer), the rest read from storage on use.
Baselines are particular candidates, so the heuristic's search space contains them.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

from ec2moe_jax.scheduler.model import Instance, Plan, end_memory

COVER, FIT, SWAP = 0, 1, 2
NUM_RESIDENCY = 3


def cover_counts(inst: Instance) -> jax.Array:
    """<int32>[L] fewest top experts reaching ``min_score`` per layer (>= top-k)."""
    need = jnp.sum(inst.resident_score < inst.min_score - 1e-6, -1)
    return jnp.clip(jnp.maximum(need, inst.top_k.astype(jnp.int32)), 0, inst.num_experts)


class FitRanks(NamedTuple):
    """The greedy "fit" residency of every device in rank space.

    order: <int32>[L, E] rank of each (layer, expert) in the greedy order (dense layers
      included, never admitted). items: <int32>[L E] item at each rank; layer_at: its layer.
    admitted: <int32>[S, L E + 1] MoE items of layers < s among the first r ranks.
    per_layer: <int32>[L E + 1, L] items of each MoE layer among the first r ranks.
    rank: <int32>[N, S, B, 2] ranks admitted at each split and micro-batch with 0 or 1
      spare slots (the swap buffer).
    fixed: <float32>[B, S] end bytes without resident experts (:func:`~.model.end_memory`).
    """

    order: jax.Array
    items: jax.Array
    layer_at: jax.Array
    admitted: jax.Array
    per_layer: jax.Array
    rank: jax.Array
    fixed: jax.Array


def _count_prefix(x: jax.Array, block: int = 32) -> jax.Array:
    """<int32>[I+1, L] exclusive prefix counts of the booleans ``x`` [I, L] along axis 0.

    A blocked matmul with a triangular matrix instead of ``jnp.cumsum``, which XLA:CPU runs
    several times slower at this size (the scheduler's decision-time budget); exact in
    float32 for counts below 2^24.
    """
    i, cols = x.shape
    nb = -(-i // block)
    xb = jnp.pad(x.astype(jnp.float32), ((0, nb * block - i), (0, 0))).reshape(nb, block, cols)
    tri = jnp.tril(jnp.ones((block, block), jnp.float32))
    within = jnp.einsum("ij,njl->nil", tri, xb)
    offsets = jnp.cumsum(within[:, -1], 0) - within[:, -1]  # [nb, L]
    out = (within + offsets[:, None]).reshape(nb * block, cols)[:i]
    return jnp.concatenate([jnp.zeros((1, cols), jnp.int32), jnp.round(out).astype(jnp.int32)])


def fit_ranks(inst: Instance) -> FitRanks:
    """:class:`FitRanks`: experts handed out greedily by routing mass over the end layers
    (the order of :func:`ec2moe_jax.selection.selection_order`) until each device's memory
    is full.

    The greedy order of the first ``s`` layers is the global order restricted to them (the
    priority of an expert does not depend on the others), so one ranking serves all splits.
    """
    L, E = inst.num_layers, inst.num_experts
    moe = inst.is_moe > 0
    # selection_order's ranking with one sort: rows of inst.freq are already sorted, so an
    # expert's rank within its layer is its index (tests check the two agree).
    prio = jnp.where(moe[:, None], inst.freq, -3.0) + 2.0 * (jnp.arange(E) < inst.top_k)
    items = jnp.argsort(-prio.reshape(-1), stable=True)  # item at each rank
    order = jnp.zeros(L * E, jnp.int32).at[items].set(jnp.arange(L * E, dtype=jnp.int32))
    order = order.reshape(L, E)
    layer_at = items // E  # layer of the item at each rank
    ok_at = moe[layer_at]
    splits = jnp.arange(L + 1)
    onehot = (layer_at[:, None] == jnp.arange(L)[None, :]) & ok_at[:, None]
    per_layer = _count_prefix(onehot)  # [I+1, L]
    below = (jnp.arange(L)[:, None] < splits[None, :]).astype(jnp.float32)  # [L, S]
    admitted = jnp.round(per_layer.astype(jnp.float32) @ below).astype(jnp.int32).T
    cum = admitted[:, 1:]  # [S, I]: MoE items of layers < s among the first r + 1 ranks
    zero = jnp.zeros((L + 1, L), jnp.int32)
    no = jnp.zeros(L + 1, jnp.int32)
    fixed = jax.vmap(lambda b: end_memory(inst, Plan(splits, zero, no > 0, no, no), b))(
        inst.batch)  # [B, S]
    slots = jnp.floor((inst.end_mem[:, None, None] - fixed[None]) / inst.end_expert_bytes)
    slots = jnp.maximum(slots[..., None] - jnp.arange(2.0), 0).astype(jnp.int32)
    n, b = slots.shape[:2]  # [N, B, S, 2]
    # Ranks admitted at split s: the longest rank prefix whose in-prefix count fits the slots.
    r = jax.vmap(lambda c, q: jnp.searchsorted(c, q, side="right"))(
        cum, slots.transpose(2, 0, 1, 3).reshape(L + 1, n * b * 2))  # [S, N*B*2]
    return FitRanks(order, items, layer_at, admitted, per_layer,
                    r.reshape(L + 1, n, b, 2).transpose(1, 0, 2, 3).astype(jnp.int32), fixed)


def fit_counts(inst: Instance, spare_slots: int = 0, ranks: FitRanks | None = None
               ) -> jax.Array:
    """<int32>[N, S, B, L] experts per layer that fit each device at each split and
    micro-batch, less ``spare_slots`` (0 or 1); greedy by routing mass over the end layers."""
    fr = fit_ranks(inst) if ranks is None else ranks
    L = inst.num_layers
    end = jnp.arange(L) < jnp.arange(L + 1)[:, None, None]  # [S, 1, L]
    return fr.per_layer[fr.rank[..., spare_slots]] * end


def candidates(inst: Instance) -> Plan:
    """Every device's candidate plans in broadcastable form: split [1, S, 1, 1, 1], resident
    [N, S, R, 1, B, L], swap [1, 1, R, 1, 1], codec [1, 1, 1, C, 1], batch [1, 1, 1, 1, B].

    Scoring this compact form computes the per-layer work once per (device, split,
    residency, micro-batch) and only the cheap link and codec terms per codec option; the
    flat candidate index is ``((s R + r) C + c) B + b`` (see :func:`flatten`).
    """
    L = inst.num_layers
    n, C, B = inst.num_devices, inst.codec_bytes.shape[0], inst.batch.shape[0]
    S, R = L + 1, NUM_RESIDENCY
    end = jnp.arange(L)[None, :] < jnp.arange(S)[:, None]  # [S, L]
    cover = jnp.broadcast_to(jnp.where(end, cover_counts(inst)[None, :], 0)[:, None],
                             (n, S, B, L))
    fr = fit_ranks(inst)
    res = jnp.stack([cover, fit_counts(inst, 0, fr), fit_counts(inst, 1, fr)], 2)  # [N, S, R, B, L]
    i32 = jnp.int32
    return Plan(split=jnp.arange(S, dtype=i32).reshape(1, S, 1, 1, 1),
                resident=res[:, :, :, None],
                swap=(jnp.arange(R) == SWAP).reshape(1, 1, R, 1, 1),
                codec=jnp.arange(C, dtype=i32).reshape(1, 1, 1, C, 1),
                batch=jnp.arange(B, dtype=i32).reshape(1, 1, 1, 1, B))


def flatten(inst: Instance, tree, trailing: int = 0):
    """Broadcasts compact candidate arrays (a Plan or Terms) to [N, S, R, C, B] (+ trailing
    dims of ``resident``) and flattens the candidates to [N, K]."""
    n, S = inst.num_devices, inst.num_layers + 1
    full = (n, S, NUM_RESIDENCY, inst.codec_bytes.shape[0], inst.batch.shape[0])

    def one(x):
        extra = x.shape[5:] if x.ndim > 5 else ()
        return jnp.broadcast_to(x, full + extra).reshape((n, -1) + extra)

    return jax.tree.map(one, tree)


def candidate_index(inst: Instance, split, residency, codec=0, batch=0):
    """Flat candidate index of (split, residency option, codec, micro-batch)."""
    C, B = inst.codec_bytes.shape[0], inst.batch.shape[0]
    return ((split * NUM_RESIDENCY + residency) * C + codec) * B + batch


def baseline_indices(inst: Instance) -> dict[str, jax.Array]:
    """Candidate indices (same for every device) of the baselines: cloud-only, end-only with
    non-fitting experts dropped, end-only with them swapped from storage, and every uniform
    single split without codec (micro-batch 1, experts fitted greedily)."""
    L = inst.num_layers
    return {
        "cloud_only": jnp.asarray([candidate_index(inst, 0, COVER)]),
        "end_only_drop": jnp.asarray([candidate_index(inst, L, FIT)]),
        "end_only_swap": jnp.asarray([candidate_index(inst, L, SWAP)]),
        "single_split": candidate_index(inst, jnp.arange(1, L), FIT),
    }


def take(plans: Plan, index: jax.Array) -> Plan:
    """Per-device selection: ``plans`` [N, K, ...] at ``index`` [N] -> [N, ...]."""
    n = jnp.arange(index.shape[0])
    return jax.tree.map(lambda x: x[n, index], plans)
