"""Residency-aware training of the LM: random expert masks so any resident subset works.

*Ours*, beyond the paper's abstract. An LM trained with every expert always available
specialises its experts so sharply that an end device holding half of them loses most of
its quality, whatever its gate does (see ``results/hlggn.json``). A short fine-tune in which
each step routes the leading layers over a random subset of experts (2..E-1 of E) teaches
the model to degrade gracefully. This changes the LM (unlike gate training, which keeps it
frozen), so its full-model quality is reported next to the original's.

The same masks serve pre-training (``train.residency_prob`` in the main recipe, through
:func:`~ec2moe_jax.training.residency.step_residency`) and the short fine-tune of an already
trained LM (:func:`adapt_to_residency`).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
from tqdm.auto import tqdm

from ec2moe_jax import data as data_lib
from ec2moe_jax.config import MoEConfig
from ec2moe_jax.models import MoELM
from ec2moe_jax.training.residency import moe_layer_indices, random_residency
from ec2moe_jax.training.steps import token_nll
from ec2moe_jax.training.workdir import calibration_window


def adapt_to_residency(model: MoELM, params, tokens: np.ndarray, *, steps: int = 400,
                       learning_rate: float = 1e-3, batch_size: int = 16,
                       seq_len: int | None = None, seed: int = 21, progress: bool = True
                       ) -> tuple[dict, list[dict]]:
    """Fine-tunes every LM parameter under random residency masks; returns (params, history).

    The mask is an argument of the jitted step, so new masks do not recompile.
    """
    seq_len = calibration_window(model, seq_len)
    moe: MoEConfig = model.cfg.moe
    if moe.num_experts < 3:
        raise ValueError(f"num_experts={moe.num_experts}: residency needs at least 3 experts")

    def loss_fn(p, batch, allowed):
        logits, aux = model.apply({"params": p}, batch["inputs"], deterministic=False,
                                  return_aux=True, allowed=allowed)
        nll = token_nll(logits, batch["targets"]).mean()
        return nll + moe.aux_loss_coef * aux["aux_loss"] + moe.z_loss_coef * aux["z_loss"], nll

    tx = optax.adamw(optax.warmup_cosine_decay_schedule(
        0.0, learning_rate, min(30, steps // 2), max(steps, 2), learning_rate * 0.1),
        weight_decay=0.1)
    opt_state = tx.init(params)

    @jax.jit
    def step(p, opt_state, batch, allowed):
        (_, nll), grads = jax.value_and_grad(loss_fn, has_aux=True)(p, batch, allowed)
        updates, opt_state = tx.update(grads, opt_state, p)
        return optax.apply_updates(p, updates), opt_state, nll

    rng = np.random.default_rng(seed)
    history = []
    for i in tqdm(range(steps), disable=not progress, desc="residency fine-tune", leave=False):
        batch = data_lib.train_batch(tokens, i, batch_size=batch_size, seq_len=seq_len,
                                     seed=seed)
        allowed = random_residency(rng, moe_layer_indices(model.cfg), model.cfg.num_layers,
                                   moe.num_experts,
                                   min_resident=moe.top_k)
        params, opt_state, nll = step(params, opt_state, batch, jnp.asarray(allowed))
        if i % 25 == 0 or i == steps - 1:
            history.append({"step": i + 1, "nll": float(nll)})
    return params, history
