"""Pure train and eval steps for the LM; callers jit them with shardings and donation.

Shape legend: B batch, T time, V vocab.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import flax.struct
import jax
import jax.numpy as jnp
import optax

from ec2moe_jax.config import MoEConfig, TrainConfig
from ec2moe_jax.models import MoELM

LN2 = math.log(2.0)


@flax.struct.dataclass
class TrainState:
    step: jax.Array
    params: dict
    opt_state: optax.OptState


def learning_rate_schedule(cfg: TrainConfig) -> optax.Schedule:
    """Linear warmup to ``learning_rate``, cosine decay to ``min_lr_ratio`` of it at
    ``schedule_steps`` (default ``steps``), then constant: an extended run's extra steps."""
    return optax.warmup_cosine_decay_schedule(
        init_value=0.0,
        peak_value=cfg.learning_rate,
        warmup_steps=cfg.warmup_steps,
        decay_steps=cfg.schedule_steps or cfg.steps,  # optax holds the end value after it
        end_value=cfg.learning_rate * cfg.min_lr_ratio,
    )


def make_optimizer(cfg: TrainConfig) -> optax.GradientTransformation:
    """AdamW over :func:`learning_rate_schedule`; no weight decay on vectors (norm scales)."""
    schedule = learning_rate_schedule(cfg)
    decay_mask = lambda params: jax.tree.map(lambda x: x.ndim >= 2, params)
    return optax.chain(
        optax.clip_by_global_norm(cfg.clip_norm),
        optax.adamw(schedule, b1=cfg.b1, b2=cfg.b2, weight_decay=cfg.weight_decay,
                    mask=decay_mask),
    )


def token_nll(logits: jax.Array, targets: jax.Array) -> jax.Array:
    """<float32>[B, T] negative log-likelihood in nats."""
    return optax.softmax_cross_entropy_with_integer_labels(logits.astype(jnp.float32), targets)


def make_train_step(
    model: MoELM, optimizer: optax.GradientTransformation, moe: MoEConfig
) -> Callable[[TrainState, dict], tuple[TrainState, dict]]:
    """``step(state, batch) -> (state, metrics)``; hyperparameters are closed over.

    ``batch``: ``inputs``, ``targets`` <int32>[B, T] and optionally ``allowed`` <bool>[L, E],
    the experts each layer may route to (residency-aware training; traced, so a new mask
    compiles nothing).
    """

    def loss_fn(params, batch):
        logits, aux = model.apply({"params": params}, batch["inputs"], deterministic=False,
                                  return_aux=True, allowed=batch.get("allowed"))
        nll = token_nll(logits, batch["targets"]).mean()
        loss = nll + moe.aux_loss_coef * aux["aux_loss"] + moe.z_loss_coef * aux["z_loss"]
        metrics = {"loss": loss, "nll": nll, "bits_per_char": nll / LN2,
                   "aux_loss": aux["aux_loss"], "z_loss": aux["z_loss"]}
        if "dropped_fraction" in aux:
            metrics["dropped_fraction"] = aux["dropped_fraction"]
        return loss, metrics

    def step(state: TrainState, batch: dict) -> tuple[TrainState, dict]:
        grads, metrics = jax.grad(loss_fn, has_aux=True)(state.params, batch)
        updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        metrics["grad_norm"] = optax.tree_utils.tree_norm(grads)
        return TrainState(step=state.step + 1, params=params, opt_state=opt_state), metrics

    return step


def bits_per_char(
    step: Callable[[object, dict], dict],
    params,
    tokens,
    *,
    batch_size: int,
    seq_len: int,
    max_batches: int | None = None,
    stride: int | None = None,
    progress: str | None = None,
) -> float:
    """Bits per character (byte) of ``tokens``: each target scored once, summed over batches.

    ``step(params, batch) -> {"nll_sum", "count"}`` is an eval step such as
    :func:`make_eval_step`'s; windows follow :func:`ec2moe_jax.data.eval_batches`.
    ``progress``: a label for a progress bar over the batches (None: no bar).
    """
    from tqdm.auto import tqdm

    from ec2moe_jax import data as data_lib

    t, s = len(tokens) - 1, stride or seq_len
    windows = 1 + max(0, -(-(t - seq_len) // s))
    total_batches = -(-windows // batch_size)
    if max_batches is not None:
        total_batches = min(total_batches, max_batches)
    total = count = 0.0
    batches = data_lib.eval_batches(tokens, batch_size=batch_size, seq_len=seq_len,
                                    max_batches=max_batches, stride=stride)
    for batch in tqdm(batches, total=total_batches, desc=progress, unit="batch",
                      disable=progress is None, leave=False):
        out = step(params, batch)
        total, count = total + float(out["nll_sum"]), count + float(out["count"])
    return total / max(count, 1.0) / LN2


def make_eval_step(model: MoELM) -> Callable[[dict, dict], dict]:
    """``eval(params, batch) -> {'nll_sum', 'count'}`` over the batch's masked targets."""

    def step(params, batch):
        logits = model.apply({"params": params}, batch["inputs"], deterministic=True)
        nll = token_nll(logits, batch["targets"])
        mask = batch["mask"]
        return {"nll_sum": jnp.sum(nll * mask), "count": jnp.sum(mask)}

    return step
