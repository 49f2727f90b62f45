"""Fast scoring of every device's candidate plans by prefix sums over layers.

Shape legend: L layers, E experts, N end devices, S = L + 1 splits, R residency options,
C codec options, B micro-batch options, K = S R C B candidates per device, I = L E items.

:func:`~.model.plan_terms` sums per-layer work under a split mask, ``O(N S R B L)`` per phase.
Here every per-layer quantity becomes a prefix sum over layers (``O(B L)``), and the
route-aware weight bytes of the greedy "fit" residency are looked up per layer from the rank
``r`` the greedy order admits (the experts fitted at split ``s`` are the first ``r`` ranks of
the global greedy order restricted to the layers below ``s``). Quality constraints become
rank thresholds (a layer holds its ``n`` best experts once ``r`` passes the rank of its
``n``-th). Only ``O(N S R C B)``
cheap link, queueing and codec terms remain per device. Equivalent to ``plan_terms`` on
:func:`~.candidates.candidates` (tested), except that ``coverage`` is not computed (NaN) for
"fit" candidates: ranking needs only the violation count.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from ec2moe_jax.scheduler.candidates import (
    NUM_RESIDENCY,
    SWAP,
    FitRanks,
    cover_counts,
    fit_ranks,
)
from ec2moe_jax.scheduler.model import (
    Instance,
    Terms,
    terms_from_work,
    touched_table,
)


def _prefix(x: jax.Array) -> jax.Array:
    """[..., L] -> [..., S] sums over layers < s."""
    return jnp.concatenate([jnp.zeros_like(x[..., :1]), jnp.cumsum(x, -1)], -1)


def _phase_work(inst: Instance, fr: FitRanks, cover, tokens_per_option, context):
    """Layer work (end FLOPs, end bytes, swapped bytes, cloud FLOPs, cloud bytes) of one job
    per candidate, each [N or 1, S, R, 1, B]."""
    moe, eb = inst.is_moe, inst.expert_bytes
    L, E = inst.num_layers, inst.num_experts
    table = touched_table(inst.freq, tokens_per_option * inst.top_k)  # [B, L, E+1]
    flops = tokens_per_option[:, None] * (inst.fixed_flops + moe * inst.top_k * inst.expert_flops
                                          + inst.attn_flops * context)
    nbytes = inst.fixed_bytes + inst.kv_bytes * context * inst.batch[:, None]  # [B, L]
    all_b = moe * eb * table[:, :, E]
    cover_t = moe * jnp.take_along_axis(table, cover[None, :, None], -1)[..., 0]
    f_p, b_p, a_p, cov_p = (_prefix(x).T for x in (flops, nbytes, all_b, cover_t))  # [S, B]
    # Expected experts touched among each device's fitted ones: per layer below s, the
    # touched table at the layer's count among the first r greedy ranks ([N, S, B, 2, L]).
    counts = fr.per_layer[fr.rank]
    below = jnp.arange(L)[None, :] < jnp.arange(L + 1)[:, None]  # [S, L]
    b_idx = jnp.arange(tokens_per_option.shape[0])[None, None, :, None, None]
    touched = table[b_idx, jnp.arange(L), counts]
    fit = jnp.sum(jnp.where(below[None, :, None, None], moe * touched, 0.0), -1)
    res = jnp.concatenate([jnp.broadcast_to(cov_p[None, :, :, None], fit.shape[:3] + (1,)),
                           fit], -1)  # [N, S, B, R]: expected resident experts touched
    res = res.transpose(0, 1, 3, 2)[:, :, :, None, :]  # [N, S, R, 1, B]
    swap = (jnp.arange(NUM_RESIDENCY) == SWAP)[:, None, None]
    exp = lambda x: x[None, :, None, None, :]  # noqa: E731  [S, B] -> [1, S, 1, 1, B]
    e_fl, e_by, a_end = exp(f_p), exp(b_p) + eb * res, exp(a_p)
    # Swapping reads experts from storage as the end stores them (end_expert_bytes).
    e_sw = jnp.where(swap, (a_end - eb * res) * (inst.end_expert_bytes / eb), 0.0)
    c_fl = exp(f_p[-1:] - f_p)
    c_by = exp(b_p[-1:] - b_p + a_p[-1:] - a_p)
    return e_fl, e_by, e_sw, c_fl, c_by


def _thresholds(inst: Instance, fr: FitRanks, need: jax.Array) -> jax.Array:
    """<int32>[S] fewest greedy ranks giving every MoE layer below s its ``need`` [L] best
    experts."""
    ranks = jnp.sort(fr.order, -1)  # a layer's experts in the order they are admitted
    at = jnp.take_along_axis(ranks, jnp.clip(need - 1, 0, inst.num_experts - 1)[:, None],
                             -1)[:, 0]
    t = jnp.where(inst.is_moe > 0, at + 1, 0)
    return jnp.concatenate([jnp.zeros(1, t.dtype), jax.lax.cummax(t)])


def _violations(inst: Instance, fr: FitRanks, cover):
    """(violations [N, S, R, C, B], coverage [1, S, R, 1, 1], end bytes [N, S, R, 1, B])."""
    L, E = inst.num_layers, inst.num_experts
    moe = inst.is_moe > 0
    k = inst.top_k.astype(jnp.int32)
    splits = jnp.arange(L + 1)
    cov = inst.resident_score
    need_cov = jnp.clip(jnp.sum(cov < inst.min_score - 1e-6, -1), 1, E)
    cov_at = jnp.take_along_axis(cov, cover[:, None], -1)[:, 0]
    top = inst.best_score
    cover_min = jnp.concatenate([jnp.full(1, top), jax.lax.cummin(jnp.where(moe, cov_at, top))])
    cover_few = _prefix((moe & (cover < k)).astype(jnp.int32)) > 0
    rank = fr.rank  # [N, S, B, 2]
    fit_cov = rank[..., 0] < _thresholds(inst, fr, need_cov)[:, None]
    fit_few = rank < _thresholds(inst, fr, jnp.zeros(L, jnp.int32) + k)[:, None, None]
    f32 = lambda x: x.astype(jnp.float32)  # noqa: E731
    cover_bad = f32(cover_min < inst.min_score - 1e-6) + f32(cover_few)  # [S]
    quality = jnp.stack([jnp.broadcast_to(cover_bad[:, None], fit_cov.shape),
                         f32(fit_cov) + f32(fit_few[..., 0]), f32(fit_few[..., 1])],
                        2)  # [N, S, R, B]: swapping lifts the coverage constraint
    count = jnp.concatenate([jnp.broadcast_to(_prefix(moe * cover)[None, :, None, None],
                                              rank.shape[:3] + (1,)),
                             fr.admitted[splits[None, :, None, None], rank]], -1)
    count = count.transpose(0, 1, 3, 2)  # [N, S, R, B]
    buf = jnp.where(jnp.arange(NUM_RESIDENCY) == SWAP, inst.end_expert_bytes, 0.0)
    mem = fr.fixed.T[None, :, None, :] + jnp.where(
        splits[None, :, None, None] > 0, inst.end_expert_bytes * count + buf[:, None], 0.0)
    mem = mem[:, :, :, None, :]
    mid = (splits > 0) & (splits < L)
    codec = mid[:, None] & (inst.codec_quality > inst.codec_budget + 1e-9)  # [S, C]
    dev_mem = inst.end_mem[:, None, None, None, None]
    viol = ((mem > dev_mem) + quality[:, :, :, None, :] + codec[None, :, None, :, None]
            + (splits < inst.min_end_layers[:, None])[:, :, None, None, None])
    coverage = jnp.stack([cover_min, jnp.full(L + 1, jnp.nan), jnp.full(L + 1, top)], -1)
    return viol.astype(jnp.float32), coverage[None, :, :, None, None], mem


def candidate_terms(inst: Instance) -> tuple[Terms, FitRanks]:
    """Compact :class:`~.model.Terms` [N, S, R, C, B] of every device's candidates (flatten
    with :func:`~.candidates.flatten`) and the fit ranks that define their residency."""
    fr = fit_ranks(inst)
    cover = cover_counts(inst)
    T, G = inst.prompt_tokens, inst.gen_tokens
    work_p = _phase_work(inst, fr, cover, inst.batch * T, T / 2)
    work_d = _phase_work(inst, fr, cover, inst.batch, T + G / 2)
    viol, coverage, mem = _violations(inst, fr, cover)
    n, S = inst.num_devices, inst.num_layers + 1
    i32 = jnp.int32
    terms = terms_from_work(
        inst, jnp.arange(S, dtype=i32).reshape(1, S, 1, 1, 1),
        jnp.arange(inst.codec_bytes.shape[0], dtype=i32).reshape(1, 1, 1, -1, 1),
        jnp.arange(inst.batch.shape[0], dtype=i32).reshape(1, 1, 1, 1, -1),
        jnp.arange(n).reshape(n, 1, 1, 1, 1), work_p, work_d, viol, coverage, mem)
    return terms, fr
