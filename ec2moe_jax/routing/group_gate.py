"""HL-GGN group gate maths (pure): a cheap local gate over resident experts, fused with the
global router's preferences (*ours*; the paper's abstract names the parts, not the maths).

Shape legend: N tokens (any leading axes), D model, P gate inputs (P << D), E experts,
R resident experts (``allowed``).

Experts fall into two groups on an end device: the resident group (``allowed``) and the rest
(in the cloud). Only the resident group can be chosen, so the gate scores only it:

* **local gate**: ``s(x) = x[..., inputs] @ w_local`` reads P of the D hidden coordinates
  (those carrying the most router weight on resident experts) and scores R experts, so it
  costs ``2 P R`` FLOPs per token against ``2 D E`` for the full router;
* **global gating output**: the global router's routing prior over experts, ``log f_e``
  (per-layer expert frequencies from real routing statistics, free per token);
* **learned fusion**: ``logits = softplus(t) * s(x) + beta * log f + b``, a learned
  temperature on the local scores, a learned weight on the global prior, a per-expert bias.

Selection stays separate from weighting: top-k over the allowed experts of the fused
logits selects; combine weights are the fused softmax renormalised over the chosen experts.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

_NEG = -1e30


def router_flops(d_model: int, num_experts: int) -> float:
    """FLOPs per token of the full router (one ``[D] x [D, E]`` product)."""
    return 2.0 * d_model * num_experts


def gate_flops(num_inputs: int, num_resident: int) -> float:
    """FLOPs per token of the group gate: the ``[P] x [P, R]`` product plus the fusion (a
    multiply and two adds per resident expert)."""
    return 2.0 * num_inputs * num_resident + 3.0 * num_resident


def choose_inputs(router: np.ndarray, allowed: np.ndarray, num_inputs: int,
                  scale: np.ndarray | None = None) -> np.ndarray:
    """<int32>[P] hidden coordinates that carry the most router weight on resident experts.

    Args:
      router: <float>[D, E] the full router.
      allowed: <bool>[E] resident experts.
      num_inputs: P.
      scale: <float>[D] typical magnitude of each coordinate of the router input (e.g. its
        RMS over real tokens); weights a coordinate's importance by how large it gets.
    """
    router, allowed = np.asarray(router, np.float64), np.asarray(allowed, bool)
    d = router.shape[0]
    if not 1 <= num_inputs <= d:
        raise ValueError(f"{num_inputs=} must lie in [1, d_model={d}]")
    if not allowed.any():
        raise ValueError("allowed selects no expert: the group gate needs a resident expert")
    centred = router[:, allowed] - router[:, allowed].mean(-1, keepdims=True)  # logit shifts
    energy = np.sum(centred**2, -1) * (1.0 if scale is None else np.asarray(scale) ** 2)
    return np.sort(np.argsort(-energy, kind="stable")[:num_inputs]).astype(np.int32)


def fit_local_gate(x_inputs: np.ndarray, router_logits: np.ndarray, allowed: np.ndarray,
                   ridge: float = 1e-3) -> np.ndarray:
    """Least-squares distillation of the router's resident logits onto the gate inputs.

    Solves ``min_w |x_P w - (z - mean_R z)|^2 + ridge |w|^2`` over real tokens, where z are
    the full router's logits of resident experts centred per token (softmax ignores shifts).

    Args:
      x_inputs: <float>[N, P] gate inputs of real tokens.
      router_logits: <float>[N, E] the full router's logits of the same tokens.
      allowed: <bool>[E].

    Returns:
      <float32>[P, E] with zero columns for experts outside ``allowed``.
    """
    x = np.asarray(x_inputs, np.float64)
    z = np.asarray(router_logits, np.float64)[:, allowed]
    z = z - z.mean(-1, keepdims=True)
    gram = x.T @ x + ridge * len(x) * np.eye(x.shape[1])
    w = np.linalg.solve(gram, x.T @ z)
    out = np.zeros((x.shape[1], len(allowed)))
    out[:, allowed] = w
    return out.astype(np.float32)


def group_gate_logits(params: dict, x: jax.Array, inputs: jax.Array,
                      log_prior: jax.Array) -> jax.Array:
    """Fused gate logits.

    Args:
      params: ``w_local`` <float32>[P, E], ``bias`` [E], ``temperature`` [] (pre-softplus),
        ``prior_weight`` [].
      x: <float32>[..., D] router input.
      inputs: <int32>[P] coordinates the local gate reads.
      log_prior: <float32>[E] log routing frequencies of the global router.

    Returns:
      <float32>[..., E]; only the allowed entries matter (top-k masks the rest).
    """
    local = jnp.take(x, inputs, axis=-1) @ params["w_local"]
    # softplus(0.5413) = 1: a fresh gate starts as the distilled local scores.
    tau = jax.nn.softplus(params["temperature"] + 0.5413248546129181)
    return tau * local + params["prior_weight"] * log_prior + params["bias"]


def masked_log_softmax(logits: jax.Array, allowed: jax.Array) -> jax.Array:
    """Log-softmax over the allowed experts only (``-1e30`` elsewhere)."""
    return jax.nn.log_softmax(jnp.where(allowed, logits, _NEG), axis=-1)


def distillation_loss(router_logits: jax.Array, gate_logits: jax.Array,
                      allowed: jax.Array) -> jax.Array:
    """Mean KL(full router renormalised over allowed experts || gate over allowed experts).

    Args:
      router_logits, gate_logits: <float32>[..., E].
      allowed: <bool>[E].
    """
    target = masked_log_softmax(router_logits, allowed)
    pred = masked_log_softmax(gate_logits, allowed)
    kl = jnp.sum(jnp.where(allowed, jnp.exp(target) * (target - pred), 0.0), axis=-1)
    return jnp.mean(kl)


def recall_at_k(full_index: jax.Array, gate_index: jax.Array, gate_valid: jax.Array) -> jax.Array:
    """Mean share of the full router's top-k choices that the gate also makes.

    Args:
      full_index: <int32>[..., K] the full router's choices.
      gate_index: <int32>[..., K] the gate's choices; ``gate_valid`` <bool>[..., K] masks
        choices that were not made (fewer allowed experts than K).
    """
    hit = (full_index[..., :, None] == gate_index[..., None, :]) & gate_valid[..., None, :]
    return jnp.mean(jnp.any(hit, axis=-1))
