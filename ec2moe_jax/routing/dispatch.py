"""Moving tokens to their experts and back: three implementations of one contract.

Shape legend: G groups, S tokens per group, D model, F expert hidden, E experts, K top-k,
C capacity.

All three compute ``out[g, s] = sum_k w[g, s, k] * expert_{e[g, s, k]}(x[g, s])`` over the
kept choices of a :class:`~ec2moe_jax.routing.topk.Route`:

* ``einsum``: one-hot dispatch/combine tensors [G, S, E, C] (GShard, vmoe). Portable and
  GSPMD-friendly, the reference; its cost grows with S * E * C.
* ``gather``: a slot table [E * C] of token indices built by scatter, a gather into the
  [E, C, D] expert buffers, and a gather back per choice. Same drops as ``einsum``, no
  one-hot tensors; the fast path on CPU.
* ``ragged``: sort the S * K choices by expert and run ``jax.lax.ragged_dot`` over the
  group sizes (dropless; capacity is ignored). The fast path on GPU/TPU.
* ``gathered`` (decode-shaped): gather each choice's expert weights and run G * S * K
  single-token SwiGLUs. Touches only the chosen experts: for a decode step (few tokens) it
  reads K experts' weights per token where the others compute every expert's slots. Same
  drops as the route (a dropped choice has weight 0). The MoE block picks it by token count.
* ``looped`` (prefill-shaped, one buffer per expert): the kept choices sorted by expert and
  padded to chunks, a loop over the filled chunks with each chunk's expert. Work follows the
  choices made; the MoE block picks it for few tokens beyond a decode step's.

``einsum`` and ``gather`` produce expert inputs laid out [E, G * C, D] so the expert weights
[E, D, F] apply as one batched matmul, sharded on the logical 'expert' axis.
"""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp

from ec2moe_jax import kernels
from ec2moe_jax.routing.topk import Route
from ec2moe_jax.sharding.mesh import constrain

Matmul = Callable[[jax.Array, jax.Array], jax.Array]


def swiglu(x: jax.Array, w_gate: jax.Array, w_up: jax.Array, w_down: jax.Array,
           matmul: Matmul = kernels.matmul) -> jax.Array:
    """The SwiGLU feed-forward ``(silu(x W_g) * (x W_u)) W_d`` (Shazeer 2020, "GLU Variants
    Improve Transformer", eq. 6 with Swish_1 = SiLU), the one definition every expert and
    dense layer uses.

    ``matmul(a, w)`` applies one weight: a plain matmul for a dense layer ([..., D] @ [D, F]),
    a batched einsum over stacked experts ([E, N, D] x [E, D, F]), or a grouped
    ``ragged_dot``. The default, :func:`ec2moe_jax.kernels.matmul`, is ``jnp.matmul`` with
    one-row float32 products on a CPU (a decode-shaped choice) in a threaded kernel. Shapes
    follow ``matmul``; the output has ``x``'s leading shape.
    """
    h = jax.nn.silu(matmul(x, w_gate)) * matmul(x, w_up)
    return matmul(h, w_down)

ExpertFn = Callable[[jax.Array], jax.Array]  # [E, N, D] -> [E, N, D]


def einsum_moe(x: jax.Array, route: Route, expert_fn: ExpertFn) -> jax.Array:
    """Reference dispatch with one-hot tensors. ``x``: [G, S, D] -> [G, S, D]."""
    num_groups, _, dim = x.shape
    e = jax.nn.one_hot(route.expert_index, route.num_experts, dtype=jnp.float32)
    c = jax.nn.one_hot(route.position, route.capacity, dtype=jnp.float32)
    # [G, S, E, C]: 1 where token s occupies slot c of expert e; combine adds the weights.
    dispatch = jnp.einsum("gske,gskc->gsec", e * route.kept[..., None], c)
    combine = jnp.einsum("gske,gskc->gsec", e * route.combine_weights[..., None], c)
    xe = jnp.einsum("gsd,gsec->egcd", x, dispatch.astype(x.dtype))
    xe = constrain(xe, ("expert", "batch", None, "embed"))
    ye = expert_fn(xe.reshape(route.num_experts, num_groups * route.capacity, dim))
    ye = ye.reshape(route.num_experts, num_groups, route.capacity, dim)
    ye = constrain(ye, ("expert", "batch", None, "embed"))
    return jnp.einsum("egcd,gsec->gsd", ye, combine.astype(ye.dtype))


def _slot_ids(route: Route) -> jax.Array:
    """<int32>[G, S, K] flat slot ``e * C + c`` of each choice; ``E * C`` where not kept."""
    flat = route.expert_index * route.capacity + route.position
    return jnp.where(route.kept, flat, route.num_experts * route.capacity)


def gather_moe(x: jax.Array, route: Route, expert_fn: ExpertFn) -> jax.Array:
    """Slot-table dispatch: scatter token ids into slots, gather tokens, gather results back."""
    num_groups, num_tokens, dim = x.shape
    num_slots = route.num_experts * route.capacity
    slots = _slot_ids(route)

    def dispatch_one(xg, slots_g):
        token = jnp.broadcast_to(jnp.arange(num_tokens, dtype=jnp.int32)[:, None], slots_g.shape)
        # Empty slots point at an appended zero row; dropped choices write out of range and
        # are discarded by mode="drop".
        table = jnp.full((num_slots,), num_tokens, jnp.int32)
        table = table.at[slots_g.reshape(-1)].set(token.reshape(-1), mode="drop")
        padded = jnp.concatenate([xg, jnp.zeros((1, dim), xg.dtype)], axis=0)
        return padded[table]  # [E * C, D]

    xe = jax.vmap(dispatch_one)(x, slots)  # [G, E * C, D]
    xe = xe.reshape(num_groups, route.num_experts, route.capacity, dim).transpose(1, 0, 2, 3)
    xe = constrain(xe, ("expert", "batch", None, "embed"))
    ye = expert_fn(xe.reshape(route.num_experts, num_groups * route.capacity, dim))
    ye = ye.reshape(route.num_experts, num_groups, route.capacity, dim).transpose(1, 0, 2, 3)
    ye = ye.reshape(num_groups, num_slots, dim)

    def combine_one(yg, slots_g, w_g):
        padded = jnp.concatenate([yg, jnp.zeros((1, dim), yg.dtype)], axis=0)
        return jnp.einsum("skd,sk->sd", padded[slots_g], w_g.astype(yg.dtype))

    return jax.vmap(combine_one)(ye, slots, route.combine_weights)


def ragged_moe(
    x: jax.Array,
    route: Route,
    w_gate: jax.Array,
    w_up: jax.Array,
    w_down: jax.Array,
) -> jax.Array:
    """Dropless grouped-matmul SwiGLU experts via ``jax.lax.ragged_dot``.

    Args:
      x: [G, S, D] tokens.
      route: a dropless routing decision (``capacity_factor=None``, so ``C = S``); masked
        choices are computed but contribute nothing (their combine weight is zero).
      w_gate, w_up: [E, D, F]; w_down: [E, F, D].

    Returns:
      [G, S, D].
    """
    num_groups, num_tokens, dim = x.shape
    if route.capacity < num_tokens:
        raise ValueError(
            f"ragged dispatch is dropless but the route has capacity={route.capacity} < "
            f"{num_tokens} tokens per group; route with capacity_factor=None"
        )
    top_k = route.expert_index.shape[-1]
    num_experts = w_gate.shape[0]
    flat_x = x.reshape(num_groups * num_tokens, dim)
    expert = route.expert_index.reshape(-1)  # [G*S*K]
    order = jnp.argsort(expert, stable=True)
    sizes = jnp.bincount(expert, length=num_experts).astype(jnp.int32)
    xs = flat_x[order // top_k]
    ys = swiglu(xs, w_gate, w_up, w_down, lambda a, w: jax.lax.ragged_dot(a, w, sizes))
    y = jnp.zeros_like(ys).at[order].set(ys)  # undo the sort: row i is choice i
    y = y.reshape(num_groups, num_tokens, top_k, dim)
    return jnp.einsum("gskd,gsk->gsd", y, route.combine_weights.astype(y.dtype))


def _expert_branches(weights, ffn, dtype) -> list[Callable[[jax.Array], jax.Array]]:
    """One ``lax.switch`` branch per expert of per-expert buffers ``weights`` (tuples of E
    arrays): ``rows -> ffn(rows, *expert e's arrays)`` in ``dtype``; a switch reads the
    chosen expert's own buffers, with no slice or copy."""
    return [lambda xs, e=e: ffn(xs, *(w[e] for w in weights)).astype(dtype)
            for e in range(len(weights[0]))]


def gathered_moe(
    x: jax.Array,
    route: Route,
    w_gate: jax.Array,
    w_up: jax.Array,
    w_down: jax.Array,
    *,
    extra: tuple[jax.Array, ...] = (),
    ffn: Callable[..., jax.Array] = swiglu,
) -> jax.Array:
    """Decode-shaped experts: one single-token SwiGLU per choice on that choice's expert's
    weights, ``[G * S * K]`` expert matmuls, nothing computed for an expert no token chose.

    Args:
      x: [G, S, D] tokens (few: a decode step's B tokens).
      route: any routing decision; a dropped or masked choice contributes nothing (its
        combine weight is 0), as in the other dispatches.
      w_gate, w_up: [E, D, F]; w_down: [E, F, D].
      extra: further per-expert arrays [E, ...] sliced like the weights (expert biases).
      ffn: ``ffn(x [1, D], w_gate [D, F], w_up, w_down, *extra, matmul=...) -> [1, D]``,
        one choice on its expert's slices; default :func:`swiglu`.

    Returns:
      [G, S, D]. The choices run in a ``fori_loop`` that slices one expert's matrices at a
      time: XLA:CPU runs the batched form (gathering [G*S*K, D, F] and one batched matvec)
      several times slower, and a loop keeps the copied weights to one expert's.
    """
    num_groups, num_tokens, dim = x.shape
    top_k = route.expert_index.shape[-1]
    n = num_groups * num_tokens * top_k
    expert = route.expert_index.reshape(n)
    xs = jnp.repeat(x.reshape(-1, dim), top_k, axis=0)  # [N * K, D], choice-major per token
    weights = (w_gate, w_up, w_down, *extra)

    if isinstance(w_gate, (tuple, list)):  # one buffer per expert: unstack_experts
        # A switch over the experts reads the chosen one's own buffers: no slice, no copy.
        branches = _expert_branches(weights, ffn, x.dtype)

        def one(i, out):
            y = jax.lax.switch(expert[i], branches, jax.lax.dynamic_index_in_dim(xs, i))
            return jax.lax.dynamic_update_index_in_dim(out, y.astype(out.dtype), i, 0)
    else:
        def one(i, out):
            w = [jax.lax.dynamic_index_in_dim(a, expert[i], keepdims=False) for a in weights]
            # XLA's own matmul: the kernel's operands would be materialised copies of the
            # slices (the small model's generate on stacked experts ran slower with it).
            y = ffn(jax.lax.dynamic_index_in_dim(xs, i), *w, matmul=jnp.matmul)  # [1, D]
            return jax.lax.dynamic_update_index_in_dim(out, y.astype(out.dtype), i, 0)

    ys = jax.lax.fori_loop(0, n, one, jnp.zeros((n, dim), x.dtype))
    ys = ys.reshape(num_groups, num_tokens, top_k, dim)
    return jnp.einsum("gskd,gsk->gsd", ys, route.combine_weights.astype(ys.dtype))


def looped_moe(
    x: jax.Array,
    route: Route,
    w_gate: tuple[jax.Array, ...],
    w_up: tuple[jax.Array, ...],
    w_down: tuple[jax.Array, ...],
    *,
    extra: tuple[tuple[jax.Array, ...], ...] = (),
    ffn: Callable[..., jax.Array] = swiglu,
    chunk: int = 8,
) -> jax.Array:
    """Prefill-shaped experts: the kept choices sorted by expert, each expert's run padded to
    a multiple of ``chunk`` rows, and a loop over the filled chunks (a traced trip count)
    that multiplies each chunk by its expert's own weights. Work follows the choices actually
    made: an expert is read once per ``chunk`` of its tokens and not at all if unchosen,
    where a dropless capacity-slot dispatch computes every expert on every token (E / K
    times the needed rows: 4x for 16 experts top-4, 16x for 128 experts top-8).

    Args:
      x: [G, S, D] tokens.
      route: any routing decision; choices not kept are skipped (they contribute nothing
        in the other dispatches either: combine weight 0).
      w_gate, w_up: E arrays [D, F]; w_down: E arrays [F, D] (one buffer per expert:
        :func:`~ec2moe_jax.layers.moe.unstack_experts`).
      extra: further per-expert tuples (expert biases), passed to ``ffn`` after the weights.
      ffn: ``ffn(x [chunk, D], w_gate [D, F], w_up, w_down, *extra) -> [chunk, D]``.
      chunk: rows per expert call (static).

    Returns:
      [G, S, D].
    """
    num_groups, num_tokens, dim = x.shape
    top_k = route.expert_index.shape[-1]
    num_experts = len(w_gate)
    n = num_groups * num_tokens * top_k
    # Skipped choices take the sentinel expert E: sorted last, never computed.
    expert = jnp.where(route.kept, route.expert_index, num_experts).reshape(n)
    order = jnp.argsort(expert, stable=True)  # [N] choice ids, grouped by expert
    sorted_expert = expert[order]
    counts = jnp.bincount(expert, length=num_experts + 1)[:num_experts]
    padded = (counts + chunk - 1) // chunk * chunk  # rows of each expert after padding
    padded_end = jnp.cumsum(padded)
    padded_start = padded_end - padded
    start = jnp.cumsum(counts) - counts
    kept = sorted_expert < num_experts
    safe = jnp.minimum(sorted_expert, num_experts - 1)
    rows = n + num_experts * (chunk - 1)
    rows += -rows % chunk  # static bound on the padded rows
    dest = jnp.where(kept, padded_start[safe] + jnp.arange(n) - start[safe], rows)
    # Row r of the padded layout holds token src[r] (num_tokens * G: a zero row if padding).
    src = jnp.full((rows,), num_groups * num_tokens, jnp.int32)
    src = src.at[dest].set((order // top_k).astype(jnp.int32), mode="drop")
    flat = jnp.concatenate([x.reshape(-1, dim), jnp.zeros((1, dim), x.dtype)])
    xs = flat[src]  # [R, D]
    chunk_expert = jnp.searchsorted(padded_end, jnp.arange(rows // chunk) * chunk,
                                    side="right").astype(jnp.int32)
    weights = (w_gate, w_up, w_down, *extra)
    branches = _expert_branches(weights, ffn, x.dtype)

    def one(j, ys):
        xc = jax.lax.dynamic_slice_in_dim(xs, j * chunk, chunk)
        e = jnp.minimum(chunk_expert[j], num_experts - 1)
        return jax.lax.dynamic_update_slice_in_dim(ys, jax.lax.switch(e, branches, xc),
                                                   j * chunk, 0)

    ys = jax.lax.fori_loop(0, padded_end[-1] // chunk, one, jnp.zeros((rows + 1, dim), x.dtype))
    # Choice i's result: row dest of its sorted position (the zero row rows when skipped).
    at = jnp.zeros((n,), jnp.int32).at[order].set(jnp.minimum(dest, rows))
    y = ys[at].reshape(num_groups, num_tokens, top_k, dim)
    return jnp.einsum("gskd,gsk->gsd", y, route.combine_weights.astype(y.dtype))
