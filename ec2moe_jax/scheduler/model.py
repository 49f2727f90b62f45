"""PO-ECC cost model (*ours*): per-device plan costs and the joint objective, pure and jit-able.

Shape legend: L layers, E experts, N end devices, C codec options, B micro-batch options,
P plan candidates (any leading batch shape).

A plan for one end device is ``(split s, resident experts n[L], swap, codec c, micro-batch b)``:
layers ``[0, s)`` run on the end with the ``n[l]`` most-used experts of layer ``l`` resident
(top-n by routing mass, :func:`ec2moe_jax.routing.top_n_mask`), the rest
in the cloud with every expert. ``s = 0`` is cloud-only, ``s = L`` end-only. ``swap`` reads
non-resident experts from storage when a token needs them (EdgeMoE-style) instead of dropping
them. Because cost depends only on the counts and coverage is maximal for the top-n, counts
(not subsets) are the whole resident-set decision.

Workload: a request is ``T`` prompt tokens then ``G`` generated tokens. ``G = 0`` is the
single-pass workload (scoring / prefill; stages pipeline across requests). ``G > 0`` is
autoregressive decoding: a split plan makes one end-cloud-end round trip per generated token,
cloud-only pays the round trip once and streams tokens back.

Stage time (additive roofline, calibrated; :func:`stage_time`, the one definition used by the
cost model, the fast scorer and the calibration fits): ``overhead + layers * layer_overhead +
FLOPs / (eta_f F) + bytes / (eta_b BW)`` per job, a job being one micro-batch of ``b`` requests
(prefill) or one decode step of ``b`` sequences and ``layers`` the transformer layers the stage
runs (each is several XLA ops, plus collectives on a sharded mesh). Weight bytes are
route-aware: a job reads an expert only if one of its ``t K`` choices lands on it,
``P(touched) = 1 - (1 - f_e)^(t K)`` from the routing frequencies.

Queueing: every end device, its uplink and the shared cloud are M/G/1 servers (Poisson
micro-batch arrivals at ``rate / b``; Pollaczek-Khinchine wait ``sum(r S^2) / (2 (1 - rho))``).
A request waits at a server once per visit (``1 + G`` visits when decoding), an approximation:
decode steps of one request are not Poisson arrivals.

**Objective** (minimised): the request-rate-weighted mean request latency, including
micro-batch filling, queueing, compute, transfers and RTT, subject to stability (utilisation
< 1 at every server), memory, the quality budget (each end MoE layer's resident score
>= ``min_score`` unless swapping: the routing mass its experts cover, or minus the measured
bits/char increase of holding that many; codec bits/char increase <= ``codec_budget``) and
privacy
(``split >= min_end_layers``). Violations add ``INFEASIBLE`` per violated constraint. A plan
that loads some server (the shared cloud, an end device or its uplink) to
``Instance.max_utilisation`` (default 0.9) or more is *over its margin* and scores
``UNSTABLE`` on top of its latency; one loading some server to its capacity or more is
*overloaded* and scores ``OVERLOADED + UNSTABLE * lost`` more, ``lost`` being the share of
the offered requests it cannot serve: a device at local utilisation ``u`` serves
``rate / max(1, u)`` and an overloaded cloud scales everyone's service by ``1 / rho``. So
every feasible plan within the margin beats every other, every plan within capacity beats
every overloaded one, every feasible plan beats every infeasible one, among overloaded plans
the one serving the most requests wins (throughput), and devices that are not overloaded
still minimise latency (a device whose link dropped does not drag the others with it).

Why a margin: a plan planned right up to a resource's capacity turns unstable under a few
percent of bandwidth jitter, and a re-planner then flaps between it and its alternative
(:mod:`.replan`). Planned utilisation stays below the margin, so the jitter the re-planner's
hysteresis absorbs cannot push the plan past capacity. Queueing waits, latencies and
``evaluate``'s ``mean_latency_s`` use the true capacity (finite below utilisation 1);
``max_utilisation = 1`` scores plans against the true capacity alone.
"""

from __future__ import annotations

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np

from ec2moe_jax.codec import wire

# Seconds: any plan within the utilisation margin is better (plans slower than ~3 hours on
# average are treated like ones over it). Kept small enough that float32 objectives of
# overloaded joint plans (below 4 UNSTABLE) still resolve latency differences of a few ms.
UNSTABLE = 1e4
OVERLOADED = 2 * UNSTABLE  # seconds added past capacity: any plan within capacity is better
INFEASIBLE = 1e8  # seconds per violated constraint: any feasible plan is better
MAX_UTILISATION = 0.9  # default planning margin: no planned server above 90% of capacity
HEADER_BYTES = float(wire.HEADER_BYTES)  # per message, the real wire format's header
TOKEN_BYTES = float(wire.TOKEN_BYTES)  # a token id or a per-token score on the wire


@flax.struct.dataclass
class Instance:
    """One scheduling problem as a pytree of arrays (float32 unless noted).

    Model [L]: fixed_flops, fixed_bytes, is_moe (0/1); scalars expert_flops, expert_bytes,
    attn_flops (per token per attended position), kv_bytes (per position per layer),
    embed_bytes, head_bytes, head_flops, d_model, top_k.
    freq: [L, E] routing frequencies sorted descending per layer (rows sum to 1; dense rows
      are ignored).
    Devices [N]: end_flops, end_bw (effective FLOP/s and bytes/s: available x calibrated
      efficiency), end_mem (bytes for weights and KV), end_overhead (s per job),
      end_layer_overhead (s per layer of a job), storage_bw
      (bytes/s for swapped experts), link_bps (bits/s), rtt (s), rate (requests/s),
      min_end_layers (<int32>, privacy: raw tokens never leave the device if > 0).
    Cloud scalars: cloud_flops, cloud_bw, cloud_overhead, cloud_layer_overhead.
    Workload scalars: prompt_tokens T, gen_tokens G.
    Options: codec_bytes [C] bytes per token on the wire (index 0 = bf16, no codec),
      codec_rank [C], codec_quality [C] relative bits/char increase; batch [B] micro-batch
      sizes (index 0 = 1).
    end_expert_bytes: scalar, one expert as the end stores it (``end_experts``, static: the
      model's own weights "bf16", or "int8"/"int4" weight-only,
      :class:`~ec2moe_jax.layers.QuantSpec`), for the end's memory and what swapping reads
      from storage; ``expert_bytes`` is the cloud's and the rooflines' figure.
    Quality: resident_score [L, E+1], the quality of an end MoE layer holding its top-n
      experts, n = 0..E, non-decreasing in n: the routing mass covered (the proxy,
      ``score_kind`` "coverage") or minus the measured relative bits/char increase
      (``score_kind`` "quality_loss", :class:`~.instance.ResidencyQuality`); min_score, the
      least score a plan's end layers may have unless swapping.
    Budgets: min_score, codec_budget.
    codec_specs: the :class:`~ec2moe_jax.codec.CodecSpec` of each codec option [C], static
      (part of the tree structure, not an array): plans name their codec from it.
    max_utilisation: scalar in (0, 1], the planning margin: a plan loading any server to
      this share of its capacity or more ranks with the overloaded ones (see the module
      docstring); default :data:`MAX_UTILISATION`; set with ``inst.replace``.
    """

    fixed_flops: jax.Array
    fixed_bytes: jax.Array
    is_moe: jax.Array
    expert_flops: jax.Array
    expert_bytes: jax.Array
    attn_flops: jax.Array
    kv_bytes: jax.Array
    embed_bytes: jax.Array
    head_bytes: jax.Array
    head_flops: jax.Array
    d_model: jax.Array
    top_k: jax.Array
    freq: jax.Array
    end_flops: jax.Array
    end_bw: jax.Array
    end_mem: jax.Array
    end_overhead: jax.Array
    end_layer_overhead: jax.Array
    storage_bw: jax.Array
    link_bps: jax.Array
    rtt: jax.Array
    rate: jax.Array
    min_end_layers: jax.Array
    cloud_flops: jax.Array
    cloud_bw: jax.Array
    cloud_overhead: jax.Array
    cloud_layer_overhead: jax.Array
    prompt_tokens: jax.Array
    gen_tokens: jax.Array
    codec_bytes: jax.Array
    codec_rank: jax.Array
    codec_quality: jax.Array
    batch: jax.Array
    resident_score: jax.Array
    min_score: jax.Array
    end_expert_bytes: jax.Array
    codec_budget: jax.Array
    codec_specs: tuple = flax.struct.field(pytree_node=False, default=())
    score_kind: str = flax.struct.field(pytree_node=False, default="coverage")
    end_experts: str = flax.struct.field(pytree_node=False, default="bf16")
    max_utilisation: jax.Array = flax.struct.field(default=np.float32(MAX_UTILISATION))

    @property
    def best_score(self) -> float:
        """The score of a layer that drops nothing (all coverage, or no loss): what a cloud
        layer, a dense layer or a swapping plan counts as."""
        return 1.0 if self.score_kind == "coverage" else 0.0

    def codec_name(self, index: int) -> str:
        """The name of codec option ``index`` ("bf16", "int8-r64", ...)."""
        if not 0 <= index < len(self.codec_specs):
            raise ValueError(f"codec option {index} does not exist; the instance has "
                             f"{[c.name for c in self.codec_specs]}")
        return self.codec_specs[index].name

    @property
    def num_layers(self) -> int:
        return self.fixed_flops.shape[0]

    @property
    def num_experts(self) -> int:
        return self.freq.shape[1]

    @property
    def num_devices(self) -> int:
        return self.rate.shape[0]


@flax.struct.dataclass
class Plan:
    """Joint plans of N end devices (or candidates: any leading shape instead of [N]), as
    arrays the cost model scores under jit.

    split: <int32>[N] layers on the end. resident: <int32>[N, L] resident experts per layer
    (top-n by routing mass, :func:`ec2moe_jax.routing.top_n_mask`; 0 at and after the split).
    swap: <bool>[N]. codec, batch: <int32>[N] option indices into ``Instance.codec_*`` /
    ``Instance.batch``.

    The other plan types: :class:`ec2moe_jax.pipeline.plans.PipelinePlan` is one device's
    plan *realised* (codec by name, micro-batch size, a label; what the pipeline runs and
    plan JSON files hold), made from this one by ``pipeline.plans.from_scheduler``;
    ``bench.sim.DevicePlan`` is the simulator's per-device timing key (split, micro-batch,
    kind and the version of the joint plan whose costs it looks up).
    """

    split: jax.Array
    resident: jax.Array
    swap: jax.Array
    codec: jax.Array
    batch: jax.Array


@flax.struct.dataclass
class Terms:
    """Per-device (or per-candidate) quantities the joint objective combines.

    rate: requests/s. latency: request latency excluding waits at the cloud (s). visits:
    cloud jobs one request goes through in sequence. cloud_rho: cloud utilisation it adds.
    cloud_s2: its ``sum(rate S^2)`` for the cloud's P-K wait. local_util: max utilisation
    of its own end device and uplink. penalty: violated constraints (memory, quality,
    privacy). coverage: min routing mass covered over end MoE layers (1 if none).
    end_bytes: weights + KV the end holds. wire_bytes: uplink bytes per request.
    """

    rate: jax.Array
    latency: jax.Array
    visits: jax.Array
    cloud_rho: jax.Array
    cloud_s2: jax.Array
    local_util: jax.Array
    penalty: jax.Array
    coverage: jax.Array
    end_bytes: jax.Array
    wire_bytes: jax.Array


def touched_table(freq: jax.Array, choices: jax.Array) -> jax.Array:
    """<float32>[..., L, E+1] expected distinct experts among the top-n that a job of
    ``choices`` [...] expert choices (tokens x K) reads, n = 0..E."""
    c = jnp.asarray(choices, jnp.float32)[..., None, None]
    p = 1.0 - jnp.power(jnp.clip(1.0 - freq, 0.0, 1.0), c)
    cum = jnp.cumsum(p, axis=-1)
    return jnp.concatenate([jnp.zeros_like(cum[..., :1]), cum], axis=-1)


def stage_time(flops, nbytes, layers, f, bw, overhead, layer_overhead):
    """Seconds of one stage job: ``overhead + layers * layer_overhead + flops / f + nbytes / bw``
    (``f``, ``bw``: effective FLOP/s and bytes/s, i.e. available x calibrated efficiency).

    Additive rather than ``max(compute, memory)``: on the measured CPU stages, compute and
    weight reads do not overlap well enough for the max form (``results/calibration_cpu.json``),
    and a fixed cost per layer (several XLA ops, collectives on a sharded mesh) separates
    deep from shallow stages of equal work. Works on jax and numpy arrays alike.
    """
    return overhead + layers * layer_overhead + flops / f + nbytes / bw


def _mg1(arrivals, service, service2):
    """Utilisation and P-K wait of one M/G/1 server (``inf`` wait when unstable)."""
    rho = arrivals * service
    wait = arrivals * service2 / (2.0 * jnp.maximum(1.0 - rho, 1e-9))
    return rho, jnp.where(rho < 1.0, wait, jnp.inf)


def _layer_work(inst: Instance, mask, tokens, seqs, context, res_touched, all_touched, swap):
    """FLOPs, weight+KV bytes and storage bytes of the layers in ``mask`` [..., L] for one job
    of ``tokens`` tokens in ``seqs`` sequences attending over ``context`` positions."""
    moe = inst.is_moe
    flops = tokens[..., None] * (inst.fixed_flops + moe * inst.top_k * inst.expert_flops
                                 + inst.attn_flops * context[..., None])
    flops = jnp.sum(mask * flops, -1)
    kv = inst.kv_bytes * (context * seqs)[..., None]  # the job reads its KV cache once
    nbytes = jnp.sum(mask * (inst.fixed_bytes + moe * inst.expert_bytes * res_touched + kv), -1)
    fetched = jnp.sum(mask * moe * inst.end_expert_bytes * (all_touched - res_touched), -1)
    return flops, nbytes, jnp.where(swap, fetched, 0.0)


def _layer_sums(inst: Instance, plan: Plan, tokens_per_option, context):
    """Layer work of one job for every candidate: (end FLOPs, end bytes, swapped-in bytes,
    cloud FLOPs, cloud bytes), excluding the LM head and the codec; ``tokens_per_option``
    [B] tokens of a job at each micro-batch option."""
    tokens = tokens_per_option[plan.batch]
    seqs = inst.batch[plan.batch]
    layers = jnp.arange(inst.num_layers)
    end_mask = (layers < plan.split[..., None]).astype(jnp.float32)
    # Tables per micro-batch option, gathered flat so no [..., L, E+1] array per candidate.
    table = touched_table(inst.freq, tokens_per_option * inst.top_k)  # [B, L, E+1]
    row = (plan.batch[..., None] * inst.num_layers + layers) * (inst.num_experts + 1)
    flat = table.reshape(-1)
    res_t = flat[row + plan.resident]
    all_t = flat[row + inst.num_experts]
    e_fl, e_by, e_sw = _layer_work(inst, end_mask, tokens, seqs, context, res_t,
                                   jnp.where(plan.swap[..., None], all_t, res_t), plan.swap)
    c_fl, c_by, _ = _layer_work(inst, 1.0 - end_mask, tokens, seqs, context, all_t, all_t,
                                False)
    return e_fl, e_by, e_sw, c_fl, c_by


def _job_work(inst: Instance, split, codec, tokens, work):
    """Layer work (:func:`_layer_sums`) plus the LM head and the codec of one job of ``tokens``
    tokens: (end FLOPs, end bytes, swapped-in bytes, cloud FLOPs, cloud bytes)."""
    e_fl, e_by, e_sw, c_fl, c_by = work
    end_only, cloud_only = split == inst.num_layers, split == 0
    mid = (~end_only) & (~cloud_only)
    codec_fl = jnp.where(mid, 2.0 * tokens * inst.d_model * inst.codec_rank[codec], 0.0)
    e_fl = e_fl + jnp.where(end_only, tokens * inst.head_flops, 0.0) + codec_fl
    e_by = e_by + jnp.where(end_only, inst.head_bytes, 0.0)
    c_fl = c_fl + jnp.where(end_only, 0.0, tokens * inst.head_flops) + codec_fl
    c_by = c_by + jnp.where(end_only, 0.0, inst.head_bytes)
    return e_fl, e_by, e_sw, c_fl, c_by


def _job_times(inst: Instance, split, codec, tokens, dev, work, reply_tokens=None,
               targets=False):
    """End time, cloud time, uplink bytes and downlink bytes of one job of ``tokens`` tokens
    from its layer work (:func:`_layer_sums`), adding the LM head, the codec and the link.
    The reply carries ``reply_tokens`` ids or scores (default one per token of the job);
    ``targets``: a split scoring job also sends its target ids (the cloud scores them)."""
    e_fl, e_by, e_sw, c_fl, c_by = _job_work(inst, split, codec, tokens, work)
    end_only, cloud_only = split == inst.num_layers, split == 0
    t_end = jnp.where(split > 0, stage_time(e_fl, e_by, split, inst.end_flops[dev],
                                            inst.end_bw[dev], inst.end_overhead[dev],
                                            inst.end_layer_overhead[dev]), 0.0)
    t_end = t_end + e_sw / inst.storage_bw[dev]
    t_cloud = jnp.where(~end_only, stage_time(c_fl, c_by, inst.num_layers - split,
                                              inst.cloud_flops, inst.cloud_bw,
                                              inst.cloud_overhead, inst.cloud_layer_overhead),
                        0.0)
    per_token = jnp.where(cloud_only, TOKEN_BYTES, inst.codec_bytes[codec]
                          + jnp.where(targets, TOKEN_BYTES, 0.0))
    up = jnp.where(end_only, 0.0, HEADER_BYTES + tokens * per_token)
    reply = tokens if reply_tokens is None else reply_tokens
    down = jnp.where(end_only, 0.0, HEADER_BYTES + reply * TOKEN_BYTES)
    return t_end, t_cloud, up, down


def stage_work(inst: Instance, plan: Plan, tokens, context) -> dict[str, jax.Array]:
    """Work of one job of each plan's end and cloud stage, by the cost model's own accounting:
    a job of ``inst.batch[plan.batch]`` sequences of ``tokens`` tokens each attending over
    ``context`` positions. Returns ``{end,cloud}_{flops,bytes,layers}`` and
    ``end_swap_bytes`` [...]; the stage's seconds are :func:`stage_time` of these (plus
    ``end_swap_bytes / storage_bw`` on the end). Public for calibration against measurements.
    """
    b = inst.batch[plan.batch]
    ctx = jnp.zeros_like(b) + context
    work = _layer_sums(inst, plan, inst.batch * tokens, ctx)
    e_fl, e_by, e_sw, c_fl, c_by = _job_work(inst, plan.split, plan.codec, b * tokens, work)
    end_only = plan.split == inst.num_layers
    f32 = lambda x: jnp.asarray(x, jnp.float32)  # noqa: E731
    return {"end_flops": e_fl, "end_bytes": e_by, "end_swap_bytes": e_sw,
            "end_layers": f32(plan.split),
            "cloud_flops": jnp.where(end_only, 0.0, c_fl),
            "cloud_bytes": jnp.where(end_only, 0.0, c_by),
            "cloud_layers": f32(inst.num_layers - plan.split)}


def job_costs(inst: Instance, plan: Plan, tokens, context, reply_tokens=None
              ) -> dict[str, jax.Array]:
    """Seconds and bytes of one job of each end device's plan [N] (device ``i`` uses plan
    ``i``): ``inst.batch[plan.batch]`` sequences of ``tokens`` new tokens each, attending over
    ``context`` positions (any shape broadcasting against [N], e.g. [G, 1] for every decode
    step). The reply carries ``reply_tokens`` ids or scores per sequence; the default
    (``None``) is a scoring job: ``tokens`` scores back, and a split also sends the target
    ids up. Returns ``end_s`` (compute plus swap reads), ``cloud_s``,
    ``up_bytes``, ``down_bytes``: the per-job quantities :func:`plan_terms` combines, for an
    event-driven simulator that composes jobs itself instead of using M/G/1 formulas.
    """
    dev = jnp.arange(plan.split.shape[0])
    b = inst.batch[plan.batch]
    ctx = jnp.zeros_like(b) + context
    work = _layer_sums(inst, plan, inst.batch * tokens, ctx)
    reply = tokens if reply_tokens is None else reply_tokens
    e, c, up, down = _job_times(inst, plan.split, plan.codec, b * tokens, dev, work, b * reply,
                                targets=reply_tokens is None)
    return {"end_s": e, "cloud_s": c, "up_bytes": up, "down_bytes": down}


def plan_terms(inst: Instance, plan: Plan, dev: jax.Array) -> Terms:
    """:class:`Terms` of plans ``plan`` (leading shape [...]) for end devices ``dev`` [...].

    Pure and jit-able; it scores baselines, the chosen plan and the exhaustive enumeration.
    The heuristic scores its candidates with the equivalent prefix-sum form
    (:func:`~.scoring.candidate_terms`, tested against this one), so objectives compare.
    """
    T, G = inst.prompt_tokens, inst.gen_tokens
    zeros = jnp.zeros_like(inst.batch[plan.batch])
    # Prefill job: b requests of T tokens (mean context T/2); decode step: b tokens at context
    # T + G/2 (the mean over the G steps).
    work_p = _layer_sums(inst, plan, inst.batch * T, zeros + T / 2)
    work_d = _layer_sums(inst, plan, inst.batch, zeros + T + G / 2)
    violations, coverage, mem = _constraints(inst, plan, dev, inst.batch[plan.batch])
    return terms_from_work(inst, plan.split, plan.codec, plan.batch, dev, work_p, work_d,
                           violations, coverage, mem)


def terms_from_work(inst: Instance, split, codec, batch, dev, work_p, work_d, violations,
                    coverage, mem) -> Terms:
    """:class:`Terms` from the layer work of a prefill job and a decode step (roofline,
    M/G/1 queueing, link); all arguments broadcast against each other."""
    T, G = inst.prompt_tokens, inst.gen_tokens
    L = inst.num_layers
    b = inst.batch[batch]
    lam = inst.rate[dev]
    end_only, cloud_only = split == L, split == 0
    mid = (~end_only) & (~cloud_only)
    # A prefill reply carries T scores per request (scoring) or one sampled token (decoding).
    e_p, c_p, up_p, dn_p = _job_times(inst, split, codec, (inst.batch * T)[batch], dev, work_p,
                                      jnp.where(G > 0, b, b * T), targets=G == 0)
    e_d, c_d, up_d, dn_d = _job_times(inst, split, codec, b, dev, work_d)
    # Cloud-only decoding streams tokens back: nothing goes up per step, no per-step RTT.
    up_d = jnp.where(cloud_only, 0.0, up_d)
    bw = inst.link_bps[dev] / 8.0
    x_p, x_d = up_p / bw, up_d / bw
    y_p, y_d = dn_p / bw, dn_d / bw
    rtt = inst.rtt[dev]
    arrivals = lam / b
    # End device and uplink: local M/G/1 servers.
    rho_e, w_e = _mg1(arrivals, e_p + G * e_d, e_p**2 + G * e_d**2)
    rho_l, w_l = _mg1(arrivals, x_p + G * x_d, x_p**2 + G * x_d**2)
    has_cloud = ~end_only
    visits = jnp.where(has_cloud, 1.0 + G, 0.0)
    step_link = jnp.where(mid, x_d + y_d + rtt, 0.0)
    latency = ((b - 1.0) / (2.0 * lam)
               + (split > 0) * (1.0 + G) * jnp.where(rho_e < 1, w_e, 0.0)
               + has_cloud * jnp.where(mid, 1.0 + G, 1.0) * jnp.where(rho_l < 1, w_l, 0.0)
               + e_p + G * e_d + c_p + G * c_d
               + jnp.where(has_cloud, x_p + y_p + rtt, 0.0) + G * step_link
               + jnp.where(cloud_only, G * y_d, 0.0))
    return Terms(rate=lam, latency=latency, visits=visits,
                 cloud_rho=arrivals * (c_p + G * c_d),
                 cloud_s2=arrivals * (c_p**2 + G * c_d**2),
                 local_util=jnp.maximum(rho_e, rho_l), penalty=violations,
                 coverage=coverage, end_bytes=mem,
                 wire_bytes=jnp.where(has_cloud, up_p / b + G * up_d / b, 0.0))


def end_memory(inst: Instance, plan: Plan, b: jax.Array) -> jax.Array:
    """<float32>[...] bytes the end holds: embedding, fixed layer weights, resident experts,
    LM head (end-only), one swap buffer, and the KV cache of ``b`` sequences."""
    layers = jnp.arange(inst.num_layers)
    mask = (layers < plan.split[..., None]).astype(jnp.float32)
    s = plan.split
    weights = jnp.sum(mask * (inst.fixed_bytes + inst.is_moe * inst.end_expert_bytes
                              * plan.resident), -1)
    kv = s * inst.kv_bytes * (inst.prompt_tokens + inst.gen_tokens) * b
    return jnp.where(s > 0, inst.embed_bytes + weights + kv
                     + jnp.where(plan.swap, inst.end_expert_bytes, 0.0)
                     + jnp.where(s == inst.num_layers, inst.head_bytes, 0.0), 0.0)


def _constraints(inst: Instance, plan: Plan, dev, b):
    """(violations, min end resident score, end bytes) of each candidate."""
    layers = jnp.arange(inst.num_layers)
    end_moe = (layers < plan.split[..., None]) & (inst.is_moe > 0)
    cov = inst.resident_score.reshape(-1)[layers * (inst.num_experts + 1) + plan.resident]
    min_cov = jnp.min(jnp.where(end_moe & ~plan.swap[..., None], cov, inst.best_score), -1)
    too_few = jnp.any(end_moe & (plan.resident < inst.top_k), -1)
    mem = end_memory(inst, plan, b)
    mid = (plan.split > 0) & (plan.split < inst.num_layers)
    violations = ((mem > inst.end_mem[dev]).astype(jnp.float32)
                  + (min_cov < inst.min_score - 1e-6)
                  + too_few
                  + (mid & (inst.codec_quality[plan.codec] > inst.codec_budget + 1e-9))
                  + (plan.split < inst.min_end_layers[dev]))
    return violations, min_cov, mem


def combine(rate, latency, visits, cloud_rho, cloud_s2, served, over_margin, over_capacity,
            penalty, max_util):
    """Joint objective from per-device sums: (objective, mean latency, cloud utilisation).

    Arguments are totals over devices of ``rate``, ``rate * latency``, ``rate * visits``,
    ``cloud_rho``, ``cloud_s2``, ``rate / max(1, local_util)`` (requests the device and its
    uplink can serve), ``local_util >= max_util`` (devices over the margin),
    ``local_util >= 1`` (devices over capacity; see :func:`served_terms`) and ``penalty``;
    ``max_util`` is ``Instance.max_utilisation``.

    Tiers: a plan within the margin scores its latency (< UNSTABLE for any sane plan); over
    the margin but within capacity, ``UNSTABLE`` more; over capacity, ``OVERLOADED +
    UNSTABLE * lost`` more, ``lost`` being the share of requests it cannot serve. (Past
    capacity the latency leaves out the unbounded queueing wait, so without its own tier an
    overloaded plan could look better than a stable plan with a long queue.) The mean latency
    is ``inf`` when the cloud is past capacity.
    """
    cloud_ok = cloud_rho < 1.0
    wait = jnp.where(cloud_ok, cloud_s2 / (2.0 * jnp.maximum(1.0 - cloud_rho, 1e-9)), 0.0)
    mean = (latency + visits * wait) / rate
    within = (cloud_rho < max_util) & (over_margin == 0)
    overloaded = (~cloud_ok) | (over_capacity > 0)
    lost = jnp.clip(1.0 - served / (rate * jnp.maximum(cloud_rho, 1.0)), 0.0, 1.0)
    obj = (mean + jnp.where(within, 0.0, UNSTABLE)
           + jnp.where(overloaded, OVERLOADED + UNSTABLE * lost, 0.0) + INFEASIBLE * penalty)
    return obj, jnp.where(cloud_ok, mean, jnp.inf), cloud_rho


def served_terms(terms: Terms, max_util) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Per-device (requests served, over the margin 0/1, over capacity 0/1): a device serves
    ``rate / max(1, local_util)``; it is over the margin at ``local_util >= max_util`` and
    over capacity at ``local_util >= 1``."""
    return (terms.rate / jnp.maximum(terms.local_util, 1.0),
            (terms.local_util >= max_util).astype(jnp.float32),
            (terms.local_util >= 1.0).astype(jnp.float32))


def joint_objective(terms: Terms, max_util) -> tuple[jax.Array, jax.Array, jax.Array]:
    """(objective, mean latency, cloud utilisation) of a joint plan from its [N, ...] terms
    (devices on axis 0); the mean latency is ``inf`` when any server is past its capacity."""
    served, margin, capacity = served_terms(terms, max_util)
    obj, mean, rho = combine(terms.rate.sum(0), (terms.rate * terms.latency).sum(0),
                             (terms.rate * terms.visits).sum(0), terms.cloud_rho.sum(0),
                             terms.cloud_s2.sum(0), served.sum(0), margin.sum(0),
                             capacity.sum(0), terms.penalty.sum(0), max_util)
    return obj, jnp.where(capacity.sum(0) == 0, mean, jnp.inf), rho


def evaluate(inst: Instance, plan: Plan) -> dict[str, jax.Array]:
    """Objective and diagnostics of a joint plan [N]: objective, mean_latency_s,
    cloud_utilisation, throughput_rps (the rate scale at which the bottleneck server
    saturates, times the offered rate), feasible, per-device terms."""
    terms = plan_terms(inst, plan, jnp.arange(inst.num_devices))
    obj, mean, rho = joint_objective(terms, inst.max_utilisation)
    bottleneck = jnp.maximum(rho, terms.local_util.max())
    return {"objective": obj, "mean_latency_s": mean, "cloud_utilisation": rho,
            "bottleneck_utilisation": bottleneck,
            "throughput_rps": terms.rate.sum() / jnp.maximum(bottleneck, 1e-12),
            "feasible": terms.penalty.sum() == 0, "terms": terms}
