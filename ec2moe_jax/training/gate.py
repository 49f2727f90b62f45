"""HL-GGN: initialising, training (optax, LM frozen) and evaluating the group gates of the
end layers of a split model.

Shape legend: B batch, T time, D model, E experts, K top-k, P gate inputs, L layers.

The end runs layers ``[0, num_end_layers)`` with only the resident experts of a
:class:`~ec2moe_jax.selection.Selection`; in each end MoE layer a
:class:`~ec2moe_jax.layers.group_gate.GroupGate` replaces the router. The cloud runs the
remaining layers with every expert. Gates start from a least-squares distillation of the
router on real activations, then train on real text against

    loss = CE(next byte) + distill_weight * KL(router over allowed || gate over allowed)
           + aux_weight * load-balance(end layers)

with every LM parameter frozen.
"""

from __future__ import annotations

import os

import jax
import jax.numpy as jnp
import numpy as np
import optax
from tqdm.auto import tqdm

from ec2moe_jax import data as data_lib
from ec2moe_jax.layers.group_gate import GateRecorder, GateSpec, make_gates
from ec2moe_jax.models import MoELM
from ec2moe_jax.profiles import DeviceProfile
from ec2moe_jax.routing import group_gate as gg
from ec2moe_jax.routing.topk import Route
from ec2moe_jax.selection import Selection, select_for_profile
from ec2moe_jax.training.checkpoint import restore_tree, save_tree
from ec2moe_jax.training.steps import bits_per_char, token_nll
from ec2moe_jax.training.workdir import calibration_window, load_run


def router_inputs(model: MoELM, params, tokens: jax.Array, layers: tuple[int, ...],
                  allowed: jax.Array | None = None) -> dict[int, jax.Array]:
    """Router inputs [B, T, D] (the normed FFN input) of ``layers`` on ``tokens``."""
    v = {"params": params}
    x = model.apply(v, tokens, method="embed")
    _, state = model.apply(v, x, 0, max(layers) + 1, allowed=allowed, method="layers",
                           capture_intermediates=lambda m, _: m.name == "ffn_norm",
                           mutable=["intermediates"])
    return {i: state["intermediates"][f"layer_{i}"]["ffn_norm"]["__call__"][0] for i in layers}


def init_gates(model: MoELM, lm_params, selection: Selection | tuple[np.ndarray, int],
               frequencies: np.ndarray, tokens: np.ndarray, *, num_inputs: int | None = None,
               batches: int = 8, batch_size: int = 16, seq_len: int | None = None, seed: int = 4321
               ) -> tuple[GateSpec, dict]:
    """Chooses each gate's inputs and distils the router onto them by least squares.

    Args:
      selection: a :class:`Selection`, or ``(allowed [L, E], num_end_layers)``.
      frequencies: <float>[M, E] routing frequencies of the MoE layers (the global prior).
      tokens: training text; ``batches`` random windows of it are the fitting data.
      num_inputs: P (default ``D // 4``).

    Returns:
      ``(spec, gate_params)`` with ``gate_params[f"layer_{i}"]`` a GroupGate's params.
    """
    seq_len = calibration_window(model, seq_len)
    cfg = model.cfg
    if isinstance(selection, Selection):
        allowed_np, num_end = np.asarray(selection.allowed), selection.num_end_layers
    else:
        allowed_np, num_end = np.asarray(selection[0], bool), int(selection[1])
    if num_end == 0:
        raise ValueError("the selection runs no layer on the end; there is no end gate to "
                         "train")
    p = num_inputs or cfg.d_model // 4
    moe_rows = [i for i in range(cfg.num_layers) if cfg.is_moe_layer(i)]
    layers = tuple(i for i in moe_rows if i < num_end)
    log_prior = np.zeros((cfg.num_layers, cfg.moe.num_experts), np.float32)
    log_prior[moe_rows] = np.log(np.maximum(np.asarray(frequencies, np.float64), 1e-6))
    allowed = jnp.asarray(allowed_np)
    fn = jax.jit(lambda prm, t: router_inputs(model, prm, t, layers, allowed))
    xs = {i: [] for i in layers}
    for b in range(batches):
        batch = data_lib.train_batch(tokens, b, batch_size=batch_size, seq_len=seq_len,
                                     seed=seed)
        for i, x in fn(lm_params, batch["inputs"]).items():
            xs[i].append(np.asarray(x, np.float64).reshape(-1, cfg.d_model))
    inputs, gate_params = [], {}
    for i in layers:
        x = np.concatenate(xs[i])
        router = np.asarray(lm_params[f"layer_{i}"]["moe"]["router"], np.float64)
        idx = gg.choose_inputs(router, allowed_np[i], p, np.sqrt((x**2).mean(0)))
        w = gg.fit_local_gate(x[:, idx], x @ router, allowed_np[i])
        inputs.append(tuple(int(j) for j in idx))
        e = cfg.moe.num_experts
        gate_params[f"layer_{i}"] = {"w_local": jnp.asarray(w), "bias": jnp.zeros(e),
                                     "temperature": jnp.zeros(()),
                                     "prior_weight": jnp.zeros(())}
    spec = GateSpec(allowed_np, num_end, layers, tuple(inputs), log_prior)
    return spec, gate_params


def split_forward(model: MoELM, lm_params, tokens: jax.Array, spec: GateSpec,
                  gate_params: dict | None, mode: str = "gate"
                  ) -> tuple[jax.Array, list[Route], GateRecorder]:
    """Logits [B, T, V] of the split model, the end MoE layers' routes, and the full
    router's (and gates') logits at the same inputs.

    ``mode``: "full" (every expert everywhere), "masked" (plain top-k over resident
    experts) or "gate" (the group gates).
    """
    if mode not in ("full", "masked", "gate"):
        raise ValueError(f"{mode=!r} must be 'full', 'masked' or 'gate'")
    v = {"params": lm_params}
    recorder = GateRecorder()
    gates = make_gates(model, spec, gate_params, recorder) if mode == "gate" else None
    allowed = None if mode == "full" else jnp.asarray(spec.allowed)
    x = model.apply(v, tokens, method="embed")
    x, routes = model.apply(v, x, 0, spec.num_end_layers, allowed=allowed, gates=gates,
                            method="layers")
    x, _ = model.apply(v, x, spec.num_end_layers, None, method="layers")
    if mode != "gate":  # the router drove these routes: its log-probs are its logits
        recorder.router_logits = {i: jnp.log(jnp.maximum(r.probs, 1e-30))
                                  for i, r in zip(spec.layers, routes, strict=True)}
    return model.apply(v, x, method="head"), routes, recorder


def make_gate_loss(model: MoELM, spec: GateSpec, distill_weight: float = 0.1,
                   aux_weight: float = 0.01):
    """``loss(gate_params, lm_params, batch) -> (loss, metrics)``; gradients reach the gates
    only (the LM parameters are an argument, stopped)."""

    def loss_fn(gate_params, lm_params, batch):
        lm_params = jax.lax.stop_gradient(lm_params)
        logits, routes, rec = split_forward(model, lm_params, batch["inputs"], spec,
                                            gate_params)
        ce = jnp.mean(token_nll(logits, batch["targets"]))
        kl = sum(gg.distillation_loss(rec.router_logits[i], rec.gate_logits[i],
                                      jnp.asarray(spec.allowed[i]))
                 for i in spec.layers) / len(spec.layers)
        aux = sum(r.aux_loss for r in routes)
        loss = ce + distill_weight * kl + aux_weight * aux
        return loss, {"loss": loss, "ce": ce, "distill_kl": kl, "aux": aux}

    return loss_fn


def train_gates(
    model: MoELM,
    lm_params,
    spec: GateSpec,
    gate_params: dict,
    tokens: np.ndarray,
    *,
    steps: int = 200,
    batch_size: int = 16,
    seq_len: int | None = None,
    learning_rate: float = 3e-3,
    distill_weight: float = 0.1,
    aux_weight: float = 0.01,
    seed: int = 77,
    checkpoint_dir: str | None = None,
    progress: bool = True,
) -> tuple[dict, list[dict]]:
    """Trains the gates with Adam (cosine decay), LM frozen; returns ``(gates, history)``.

    With ``checkpoint_dir`` the result is saved with orbax (atomically) as one checkpoint.
    """
    seq_len = calibration_window(model, seq_len)
    tx = optax.adam(optax.cosine_decay_schedule(learning_rate, max(steps, 1), alpha=0.1))
    opt_state = tx.init(gate_params)
    loss_fn = make_gate_loss(model, spec, distill_weight, aux_weight)

    @jax.jit
    def step(gates, opt_state, lm_params, batch):  # LM params passed in, not baked in
        (_, m), grads = jax.value_and_grad(loss_fn, has_aux=True)(gates, lm_params, batch)
        updates, opt_state = tx.update(grads, opt_state, gates)
        return optax.apply_updates(gates, updates), opt_state, m

    history = []
    bar = tqdm(range(steps), disable=not progress, desc="group gate", leave=False)
    for i in bar:
        batch = data_lib.train_batch(tokens, i, batch_size=batch_size, seq_len=seq_len,
                                     seed=seed)
        gate_params, opt_state, m = step(gate_params, opt_state, lm_params, batch)
        if i % 25 == 0 or i == steps - 1:
            history.append({"step": i + 1, **{k: float(v) for k, v in m.items()}})
            bar.set_postfix(ce=f"{history[-1]['ce']:.3f}", kl=f"{history[-1]['distill_kl']:.3f}")
    if checkpoint_dir is not None:
        save_gates(checkpoint_dir, gate_params, steps)
    return gate_params, history


def save_gates(checkpoint_dir: str, gate_params: dict, step: int = 0) -> None:
    save_tree(checkpoint_dir, gate_params, step)


def load_gates(checkpoint_dir: str, like: dict) -> dict:
    """Restores gates saved by :func:`train_gates` onto the structure of ``like``."""
    return restore_tree(checkpoint_dir,
                        jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype), like))


def evaluate_split(
    model: MoELM,
    lm_params,
    spec: GateSpec,
    gate_params: dict | None,
    tokens: np.ndarray,
    mode: str,
    *,
    batch_size: int = 16,
    seq_len: int | None = None,
    max_batches: int | None = None,
) -> dict[str, float]:
    """Bits/char of ``tokens`` and routing agreement of the end layers, for one ``mode``.

    Returns:
      ``bits_per_char``; ``recall_at_k``: share of the full router's top-k choices (on the
      same hidden states) that the end also makes; ``covered_mass``: the full router's
      probability mass on the resident experts, per token, averaged.
    """
    seq_len = calibration_window(model, seq_len)
    sums = {"recall": 0.0, "mass": 0.0, "n": 0.0}
    k = model.cfg.moe.top_k

    @jax.jit
    def step(both, batch):
        gates, lm = both
        logits, routes, rec = split_forward(model, lm, batch["inputs"], spec, gates, mode)
        nll = token_nll(logits, batch["targets"])
        recall = mass = 0.0
        for i, r in zip(spec.layers, routes, strict=True):
            full = jax.lax.top_k(rec.router_logits[i], k)[1]
            recall += gg.recall_at_k(full, r.expert_index, r.valid)
            mass += jnp.mean(jnp.sum(jax.nn.softmax(rec.router_logits[i], -1)
                                     * jnp.asarray(spec.allowed[i]), -1))
        n = max(len(spec.layers), 1)
        return {"nll_sum": jnp.sum(nll * batch["mask"]), "count": jnp.sum(batch["mask"]),
                "recall": recall / n, "mass": mass / n}

    def counting_step(both, batch):
        out = step(both, batch)
        sums["recall"] += float(out["recall"])
        sums["mass"] += float(out["mass"])
        sums["n"] += 1
        return out

    bpc = bits_per_char(counting_step, (gate_params, lm_params), tokens,
                        batch_size=batch_size, seq_len=seq_len, max_batches=max_batches)
    n = max(sums["n"], 1.0)
    return {"bits_per_char": bpc, "recall_at_k": sums["recall"] / n,
            "covered_mass": sums["mass"] / n}


def train_for_profile(workdir: str, profile: DeviceProfile, *, num_end_layers: int | None,
                      steps: int, progress: bool = True) -> tuple[dict, dict]:
    """Selects resident experts for ``profile``, trains its gates (saved under
    ``<workdir>/gates/<profile name>``) and evaluates them on 16 validation batches.

    Returns:
      ``(summary, metrics)``: the selection's summary and the gate's validation metrics.

    Raises:
      ValueError: the profile leaves no layer on the end.
    """
    from ec2moe_jax.models.costs import model_costs

    setup, params, splits, freq = load_run(workdir, progress=progress)
    sel = select_for_profile(profile, freq, model_costs(setup.cfg.model),
                             num_end_layers=num_end_layers)
    if sel.num_end_layers == 0:
        raise ValueError(f"nothing runs on {profile.name}: {sel.reason}")
    spec, gates = init_gates(setup.model, params, sel, freq, splits.train)
    gates, _ = train_gates(setup.model, params, spec, gates, splits.train, steps=steps,
                           checkpoint_dir=os.path.join(workdir, "gates", profile.name),
                           progress=progress)
    metrics = evaluate_split(setup.model, params, spec, gates, splits.val, "gate",
                             max_batches=16)
    summary = {"profile": profile.name, "num_end_layers": sel.num_end_layers,
               "resident_experts_per_layer": sel.allowed[: sel.num_end_layers].sum(-1).tolist(),
               "gate_flops_ratio": spec.flops_ratio(setup.cfg.model.d_model)}
    return summary, metrics
