"""Fitting the link codec at a split point of a frozen LM: PCA init, optax fine-tuning, eval.

Shape legend: B batch, T time, D model, V vocab, R rank.

The end runs layers ``[0, split)``, the codec crosses the link, the cloud runs
``[split, L)`` and the head. Fine-tuning minimises the KL divergence from the uncompressed
model's next-byte distribution to the compressed one, plus a relative reconstruction term,
with the LM frozen and the latent quantisation in the loop (straight-through).
"""

from __future__ import annotations

import os
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax
from tqdm.auto import tqdm

from ec2moe_jax import data as data_lib
from ec2moe_jax.codec import lowrank
from ec2moe_jax.models import MoELM
from ec2moe_jax.training.checkpoint import restore_tree, save_tree
from ec2moe_jax.training.steps import bits_per_char, token_nll
from ec2moe_jax.training.workdir import calibration_window

Transform = Callable[[dict, jax.Array], jax.Array]  # (codec params, h [B,T,D]) -> [B,T,D]


def end_hidden(model: MoELM, params, tokens: jax.Array, split: int) -> jax.Array:
    """Hidden state [B, T, D] at the split boundary (what the end would send)."""
    v = {"params": params}
    h = model.apply(v, tokens, method="embed")
    return model.apply(v, h, 0, split, method="layers")[0]


def cloud_logits(model: MoELM, params, h: jax.Array, split: int) -> jax.Array:
    """Logits [B, T, V] from a boundary hidden state (what the cloud computes)."""
    v = {"params": params}
    h = model.apply(v, h, split, None, method="layers")[0]
    return model.apply(v, h, method="head")


def collect_hidden(model: MoELM, params, tokens: np.ndarray, split: int, *, batches: int,
                   batch_size: int, seq_len: int, seed: int = 1234) -> np.ndarray:
    """Boundary activations [batches * B * T, D] of random windows, for PCA."""
    fn = jax.jit(lambda p, x: end_hidden(model, p, x, split))
    out = []
    for i in range(batches):
        batch = data_lib.train_batch(tokens, i, batch_size=batch_size, seq_len=seq_len,
                                     seed=seed)
        out.append(np.asarray(fn(params, batch["inputs"])).reshape(-1, model.cfg.d_model))
    return np.concatenate(out)


def make_codec_loss(model: MoELM, split: int, bits: str | None, recon_weight: float = 1.0):
    """``loss(codec, lm_params, tokens) -> (loss, metrics)``; gradients reach the codec only."""

    def loss_fn(codec, lm_params, tokens):
        h = jax.lax.stop_gradient(end_hidden(model, lm_params, tokens, split))
        ref = jax.lax.stop_gradient(cloud_logits(model, lm_params, h, split))
        h_hat = lowrank.roundtrip(codec, h, bits)
        logits = cloud_logits(model, lm_params, h_hat, split)
        p_ref = jax.nn.softmax(ref, -1)
        kl = jnp.sum(p_ref * (jax.nn.log_softmax(ref, -1) - jax.nn.log_softmax(logits, -1)), -1)
        recon = jnp.sum(jnp.square(h - h_hat)) / jnp.maximum(jnp.sum(jnp.square(h)), 1e-30)
        loss = kl.mean() + recon_weight * recon
        return loss, {"kl": kl.mean(), "rel_recon_sq": recon}

    return loss_fn


def finetune_codec(
    model: MoELM,
    lm_params,
    codec: dict,
    tokens: np.ndarray,
    split: int,
    *,
    bits: str | None = "int8",
    steps: int = 200,
    batch_size: int = 8,
    seq_len: int | None = None,
    learning_rate: float = 1e-3,
    seed: int = 99,
    checkpoint_dir: str | None = None,
    progress: bool = True,
) -> tuple[dict, list[dict]]:
    """Fine-tunes ``codec`` with Adam (cosine decay); returns ``(codec, metric history)``.

    With ``checkpoint_dir`` the result is saved with orbax (atomically) as one checkpoint.
    """
    seq_len = calibration_window(model, seq_len)
    codec = {k: jnp.asarray(codec[k], jnp.float32) for k in ("mean", "w_enc", "w_dec")}
    tx = optax.adam(optax.cosine_decay_schedule(learning_rate, max(steps, 1), alpha=0.1))
    opt_state = tx.init(codec)
    loss_fn = make_codec_loss(model, split, bits)

    @jax.jit
    def step(codec, opt_state, lm_params, batch_tokens):  # LM params as an argument, not
        # closed over: closed-over arrays would be baked into the program as constants
        (loss, m), grads = jax.value_and_grad(loss_fn, has_aux=True)(codec, lm_params,
                                                                     batch_tokens)
        updates, opt_state = tx.update(grads, opt_state, codec)
        return optax.apply_updates(codec, updates), opt_state, {"loss": loss, **m}

    history = []
    for i in tqdm(range(steps), disable=not progress, desc=f"codec r={codec['w_enc'].shape[1]}",
                  leave=False):
        batch = data_lib.train_batch(tokens, i, batch_size=batch_size, seq_len=seq_len,
                                     seed=seed)
        codec, opt_state, m = step(codec, opt_state, lm_params, batch["inputs"])
        if i % 25 == 0 or i == steps - 1:
            history.append({"step": i + 1, **{k: float(v) for k, v in m.items()}})
    if checkpoint_dir is not None:
        save_tree(checkpoint_dir, codec, steps)
    return codec, history


def load_codec(checkpoint_dir: str, d_model: int, rank: int) -> dict:
    """Restores a codec saved by :func:`finetune_codec`."""
    abstract = {"mean": jax.ShapeDtypeStruct((d_model,), jnp.float32),
                "w_dec": jax.ShapeDtypeStruct((rank, d_model), jnp.float32),
                "w_enc": jax.ShapeDtypeStruct((d_model, rank), jnp.float32)}
    return restore_tree(checkpoint_dir, abstract)


def split_bits_per_char(
    model: MoELM,
    lm_params,
    tokens: np.ndarray,
    split: int,
    transform: Transform | None,
    codec: dict | None = None,
    *,
    batch_size: int = 16,
    seq_len: int | None = None,
    max_batches: int | None = None,
) -> float:
    """Bits/char of ``tokens`` when the boundary hidden state goes through ``transform``.

    ``transform(codec, h)`` models the link (e.g. a bf16 cast or the codec round trip);
    None is the uncompressed float32 model. Windows are disjoint (each byte scored once).
    """
    seq_len = calibration_window(model, seq_len)
    identity = transform is None

    @jax.jit
    def step(both, batch):
        codec, lm_params = both
        h = end_hidden(model, lm_params, batch["inputs"], split)
        if not identity:
            h = transform(codec, h)
        loss = token_nll(cloud_logits(model, lm_params, h, split), batch["targets"])
        return {"nll_sum": jnp.sum(loss * batch["mask"]), "count": jnp.sum(batch["mask"])}

    return bits_per_char(step, (codec, lm_params), tokens, batch_size=batch_size,
                         seq_len=seq_len, max_batches=max_batches)


def bf16_link(_codec, h: jax.Array) -> jax.Array:
    """The uncompressed baseline link: the hidden state sent as bfloat16 (2 D bytes/token)."""
    return h.astype(jnp.bfloat16).astype(h.dtype)


def codec_link(bits: str | None) -> Transform:
    return lambda codec, h: lowrank.roundtrip(codec, h, bits)


def default_codec_dir(workdir: str, split: int, rank: int, bits: str | None) -> str:
    return os.path.join(workdir, "codec", f"split{split}_rank{rank}_{bits or 'float'}")
