"""Tokens-choose top-k routing as pure functions on one group, vmapped over groups.

Shape legend: G groups, S tokens per group, E experts, K experts per token, C capacity.

Selection and weighting are separate (as in maxtext's ``deepseek_routing``): the ``allowed``
mask decides *which* experts may be chosen, the combine weights come from the unbiased softmax
over all experts, renormalised over the chosen ones when the model family does so (Mixtral
does; OLMoE and Qwen-MoE with ``norm_topk_prob=False`` do not).

Capacity follows Switch Transformer / vmoe: slots are handed out in priority order, all
first choices before any second choice, earlier tokens first within a choice level; an
assignment whose slot is ``>= C`` is dropped (its combine weight becomes zero).
"""

from __future__ import annotations

import math

import flax.struct
import jax
import jax.numpy as jnp


@flax.struct.dataclass
class Route:
    """The routing decision of a batch of groups; every array has a leading group axis G.

    Attributes:
      expert_index: <int32>[G, S, K] chosen experts, best first.
      combine_weights: <float32>[G, S, K] weight of each choice; 0 where dropped or masked.
      position: <int32>[G, S, K] slot of each choice in its expert's buffer.
      valid: <bool>[G, S, K] the chosen expert is allowed (False only when fewer than K
        experts are allowed).
      kept: <bool>[G, S, K] the choice is processed (valid and within capacity).
      probs: <float32>[G, S, E] unbiased router softmax over all experts.
      expert_counts: <int32>[G, E] choices of each expert before capacity (allowed only).
      expert_load: <int32>[G, E] choices each expert processes (``<= capacity``).
      aux_loss: <float32>[] load-balance loss, mean over groups.
      z_loss: <float32>[] router z-loss, mean over groups.
      capacity: static int C, the slots per expert per group.
    """

    expert_index: jax.Array
    combine_weights: jax.Array
    position: jax.Array
    valid: jax.Array
    kept: jax.Array
    probs: jax.Array
    expert_counts: jax.Array
    expert_load: jax.Array
    aux_loss: jax.Array
    z_loss: jax.Array
    capacity: int = flax.struct.field(pytree_node=False)

    @property
    def num_experts(self) -> int:
        return self.probs.shape[-1]

    @property
    def dropped_fraction(self) -> jax.Array:
        """Fraction of allowed choices that did not fit their expert's capacity."""
        requested = jnp.maximum(self.expert_counts.sum(), 1)
        return 1.0 - self.expert_load.sum() / requested


def compute_capacity(
    num_tokens: int, num_experts: int, top_k: int, capacity_factor: float | None
) -> int:
    """Slots per expert per group: ``ceil(S * K * factor / E)``, capped at ``S``.

    ``None`` means dropless: an expert can receive each token at most once (the K choices of
    a token are distinct), so ``C = S`` never drops anything. The cap at ``S`` is loud about
    nothing because it changes no result: more slots than tokens are never filled.
    """
    if capacity_factor is None:
        return num_tokens
    if capacity_factor <= 0:
        raise ValueError(f"{capacity_factor=} must be > 0 or None (dropless)")
    capacity = math.ceil(num_tokens * top_k * capacity_factor / num_experts)
    return max(1, min(capacity, num_tokens))


def load_balance_loss(probs: jax.Array, choice_mask: jax.Array) -> jax.Array:
    """Switch Transformer load-balance loss (Fedus et al. 2021, eq. 4), generalised to top-k.

    Args:
      probs: <float32>[S, E] router probabilities.
      choice_mask: <float32>[S, K, E] one-hot of the (allowed) choices.

    Returns:
      ``E * sum_e f_e * P_e`` with ``f_e`` the fraction of choices for expert e and ``P_e``
      the mean probability of e; equals 1 for perfectly uniform routing.
    """
    num_experts = probs.shape[-1]
    num_choices = jnp.maximum(choice_mask.sum(), 1.0)
    fraction = choice_mask.sum(axis=(0, 1)) / num_choices
    mean_prob = probs.mean(axis=0)
    return num_experts * jnp.sum(fraction * mean_prob)


def router_z_loss(logits: jax.Array) -> jax.Array:
    """ST-MoE router z-loss (Zoph et al. 2022, eq. 5): mean squared log-partition."""
    return jnp.mean(jnp.square(jax.nn.logsumexp(logits, axis=-1)))


def _route_group(
    logits: jax.Array,
    allowed: jax.Array,
    *,
    top_k: int,
    capacity: int,
    renormalize: bool,
) -> dict[str, jax.Array]:
    """Routes one group: ``logits`` <float32>[S, E], ``allowed`` <bool>[S, E]."""
    num_tokens, num_experts = logits.shape
    probs = jax.nn.softmax(logits, axis=-1)
    neg = jnp.finfo(jnp.float32).min
    # Selection on masked logits; weights from the unmasked softmax (selection != weighting).
    _, index = jax.lax.top_k(jnp.where(allowed, logits, neg), top_k)  # [S, K]
    # With fewer than K allowed experts top_k still returns K indices; the masked ones are
    # invalid and are neither processed nor counted, so a masked expert is never chosen.
    valid = jnp.take_along_axis(allowed, index, axis=-1)
    weights = jnp.take_along_axis(probs, index, axis=-1) * valid
    if renormalize:
        weights = weights / jnp.maximum(weights.sum(-1, keepdims=True), 1e-9)

    choice = jax.nn.one_hot(index, num_experts, dtype=jnp.int32) * valid[..., None]  # [S,K,E]
    # Priority: every first choice before any second choice, earlier tokens first.
    by_priority = jnp.swapaxes(choice, 0, 1).reshape(top_k * num_tokens, num_experts)
    slot = jnp.cumsum(by_priority, axis=0) - 1
    slot = jnp.swapaxes(slot.reshape(top_k, num_tokens, num_experts), 0, 1)  # [S, K, E]
    position = jnp.sum(slot * choice, axis=-1)
    kept = valid & (position < capacity)
    counts = choice.sum(axis=(0, 1))
    load = jnp.sum(choice * kept[..., None], axis=(0, 1))
    return dict(
        expert_index=index.astype(jnp.int32),
        combine_weights=jnp.where(kept, weights, 0.0),
        position=position.astype(jnp.int32),
        valid=valid,
        kept=kept,
        probs=probs,
        expert_counts=counts.astype(jnp.int32),
        expert_load=load.astype(jnp.int32),
        aux_loss=load_balance_loss(probs, choice.astype(jnp.float32)),
        z_loss=router_z_loss(logits),
    )


def top_k_route(
    logits: jax.Array,
    *,
    top_k: int,
    capacity_factor: float | None = None,
    renormalize: bool = True,
    allowed: jax.Array | None = None,
) -> Route:
    """Routes each group's tokens to their top-k allowed experts.

    Args:
      logits: <float>[G, S, E] router logits (cast to float32 here).
      top_k: K, experts per token.
      capacity_factor: slots per expert relative to a uniform load; None = dropless.
      renormalize: renormalise combine weights over the chosen experts.
      allowed: <bool>[E], [G, E] or [G, S, E] experts that may be chosen; None = all.

    Returns:
      A :class:`Route`.
    """
    if logits.ndim != 3:
        raise ValueError(f"logits must be [G, S, E], got shape {logits.shape}")
    num_groups, num_tokens, num_experts = logits.shape
    if not 1 <= top_k <= num_experts:
        raise ValueError(f"{top_k=} must lie in [1, num_experts={num_experts}]")
    logits = logits.astype(jnp.float32)
    if allowed is None:
        allowed = jnp.ones((num_experts,), bool)
    allowed = jnp.asarray(allowed, bool)
    if allowed.ndim == 1:
        allowed = allowed[None, None, :]
    elif allowed.ndim == 2:
        allowed = allowed[:, None, :]
    if allowed.shape[-1] != num_experts:
        raise ValueError(f"allowed has {allowed.shape[-1]} experts, logits have {num_experts}")
    allowed = jnp.broadcast_to(allowed, logits.shape)
    capacity = compute_capacity(num_tokens, num_experts, top_k, capacity_factor)
    out = jax.vmap(
        lambda lg, al: _route_group(
            lg, al, top_k=top_k, capacity=capacity, renormalize=renormalize
        )
    )(logits, allowed)
    out["aux_loss"] = out["aux_loss"].mean()
    out["z_loss"] = out["z_loss"].mean()
    return Route(**out, capacity=capacity)
