"""HL-GGN evaluation: per device profile, expert selection, gate training and bits/char of
the full model, plain masked top-k and the group gate (measured on the machine at hand).

The end runs the first ``num_end_layers`` layers of a trained LM. Profiles are a device
preset (compute, bandwidth) with a memory budget for the model that holds about 25%, 50%
and 75% of the end layers' experts; our small model (30 MB) would fit whole on any real
device, so the budgets stand for the share of memory an app gets for a larger model.
"""

from __future__ import annotations

import dataclasses
import os
import time

import jax
import numpy as np

from ec2moe_jax import data as data_lib
from ec2moe_jax.models import routing_stats
from ec2moe_jax.models.costs import model_costs
from ec2moe_jax.profiles import DeviceProfile, device
from ec2moe_jax.routing import RoutingStats, load_stats, save_stats
from ec2moe_jax.selection import select_for_profile
from ec2moe_jax.training import gate as gate_lib
from ec2moe_jax.training.adapt import adapt_to_residency
from ec2moe_jax.training.loop import load_params


def collect_stats(model, params, tokens: np.ndarray, *, batches: int = 32,
                  batch_size: int = 16, seq_len: int = 128, seed: int = 7) -> RoutingStats:
    """Routing statistics of the full model over ``batches`` random training windows."""
    fn = jax.jit(lambda p, t: routing_stats(model, p, t))
    total = None
    for i in range(batches):
        batch = data_lib.train_batch(tokens, i, batch_size=batch_size, seq_len=seq_len,
                                     seed=seed)
        s = fn(params, batch["inputs"])
        total = s if total is None else total + s
    return total


def budget_profiles(costs, num_end_layers: int, fractions=(0.25, 0.5, 0.75),
                    base: str = "raspberry-pi-5-8gb") -> list[DeviceProfile]:
    """``base`` with memory for the end layers' fixed weights plus ``fraction`` of their
    experts (the resident fractions the issue asks for)."""
    end_moe = int(costs.is_moe[:num_end_layers].sum())
    fixed = costs.embed_bytes + costs.fixed_bytes[:num_end_layers].sum()
    out = []
    for f in fractions:
        slots = round(f * end_moe * costs.num_experts)
        memory = fixed + slots * costs.expert_bytes
        out.append(dataclasses.replace(
            device(base).with_memory(memory), name=f"{base}@{memory / 2**20:.2f}MiB",
            source=f"{device(base).source}; memory budget for the model: fixed weights of "
                   f"{num_end_layers} end layers + {slots} experts"))
    return out


def _evaluate_profile(model, params, spec, gates, splits, eval_kw, train_kw, ckpt_dir):
    masked = gate_lib.evaluate_split(model, params, spec, None, splits.test, "masked",
                                     **eval_kw)
    init = gate_lib.evaluate_split(model, params, spec, gates, splits.test, "gate", **eval_kw)
    t0 = time.perf_counter()
    trained, history = gate_lib.train_gates(model, params, spec, gates, splits.train,
                                            checkpoint_dir=ckpt_dir, **train_kw)
    seconds = time.perf_counter() - t0
    gate = gate_lib.evaluate_split(model, params, spec, trained, splits.test, "gate", **eval_kw)
    return masked, init, gate, history, seconds


def load_run(workdir: str):
    """``(setup, params, splits, frequencies [M, E])`` of a trained workdir; the routing
    statistics are collected once and cached as ``<workdir>/routing_stats.npz``."""
    setup, params = load_params(workdir)
    splits = data_lib.prepare_splits(setup.cfg.data)
    stats_path = os.path.join(workdir, "routing_stats.npz")
    if os.path.exists(stats_path):
        stats = load_stats(stats_path)
    else:
        stats = collect_stats(setup.model, params, splits.train)
        save_stats(stats, stats_path)
    return setup, params, splits, np.asarray(stats.frequencies)


def train_for_profile(workdir: str, profile: DeviceProfile, *, num_end_layers: int | None,
                      steps: int, progress: bool = True) -> tuple[dict, dict]:
    """Selects resident experts for ``profile``, trains its gates (saved under
    ``<workdir>/gates/<profile name>``) and evaluates them; returns (selection, metrics)."""
    setup, params, splits, freq = load_run(workdir)
    sel = select_for_profile(profile, freq, model_costs(setup.cfg.model),
                             num_end_layers=num_end_layers)
    if sel.num_end_layers == 0:
        raise ValueError(f"nothing runs on {profile.name}: {sel.reason}")
    spec, gates = gate_lib.init_gates(setup.model, params, sel, freq, splits.train)
    gates, _ = gate_lib.train_gates(setup.model, params, spec, gates, splits.train, steps=steps,
                                    checkpoint_dir=os.path.join(workdir, "gates", profile.name),
                                    progress=progress)
    metrics = gate_lib.evaluate_split(setup.model, params, spec, gates, splits.val, "gate",
                                      max_batches=16)
    summary = {"profile": profile.name, "num_end_layers": sel.num_end_layers,
               "resident_experts_per_layer": sel.allowed[: sel.num_end_layers].sum(-1).tolist(),
               "gate_flops_ratio": spec.flops_ratio(setup.cfg.model.d_model)}
    return summary, metrics


def run(workdir: str, *, num_end_layers: int = 2, gate_steps: int = 100,
        eval_batches: int = 30, adapt_steps: int = 400, progress: bool = True) -> list[dict]:
    """The HL-GGN table: one dict per profile (see README for the keys)."""
    setup, params, splits, freq = load_run(workdir)
    model, cfg = setup.model, setup.cfg
    costs = model_costs(cfg.model)
    eval_kw = {"max_batches": eval_batches}
    train_kw = {"steps": gate_steps, "progress": progress}
    full = gate_lib.evaluate_split(model, params, _spec_all(cfg), None, splits.test, "full",
                                   **eval_kw)["bits_per_char"]
    adapted = None
    if adapt_steps:
        adapted, _ = adapt_to_residency(model, params, splits.train, steps=adapt_steps,
                                        progress=progress)
        full_adapted = gate_lib.evaluate_split(model, adapted, _spec_all(cfg), None,
                                               splits.test, "full", **eval_kw)["bits_per_char"]
    rows = []
    for profile in budget_profiles(costs, num_end_layers):
        sel = select_for_profile(profile, freq, costs, num_end_layers=num_end_layers)
        spec, gates = gate_lib.init_gates(model, params, sel, freq, splits.train)
        ckpt = os.path.join(workdir, "gates", profile.name)
        masked, init, gate, history, seconds = _evaluate_profile(
            model, params, spec, gates, splits, eval_kw, train_kw, ckpt)
        gap = masked["bits_per_char"] - full
        row = {
            "profile": profile.name,
            "profile_source": profile.source,
            "num_end_layers": num_end_layers,
            "resident_fraction": sel.resident_fraction,
            "resident_experts_per_layer": sel.allowed[:num_end_layers].sum(-1).tolist(),
            "routing_mass_covered": masked["covered_mass"],
            "routing_mass_covered_stats": sel.coverage[:num_end_layers].tolist(),
            "bits_per_char_full": full,
            "bits_per_char_masked_topk": masked["bits_per_char"],
            "bits_per_char_group_gate": gate["bits_per_char"],
            "bits_per_char_group_gate_distilled_only": init["bits_per_char"],
            "gap_recovered_by_group_gate": (masked["bits_per_char"] - gate["bits_per_char"])
                                           / gap if gap > 0 else None,
            "routing_recall_at_k": gate["recall_at_k"],
            "routing_recall_at_k_masked_topk": masked["recall_at_k"],
            "gate_flops_ratio": spec.flops_ratio(cfg.model.d_model),
            "gate_inputs": len(spec.inputs[0]),
            "gate_train_seconds": seconds,
            "gate_final_train": history[-1],
        }
        if adapted is not None:
            spec_a, gates_a = gate_lib.init_gates(model, adapted, sel, freq, splits.train)
            masked_a, _, gate_a, _, _ = _evaluate_profile(
                model, adapted, spec_a, gates_a, splits, eval_kw, train_kw,
                os.path.join(workdir, "gates_adapted", profile.name))
            row["residency_adapted_lm"] = {
                "bits_per_char_full": full_adapted,
                "bits_per_char_masked_topk": masked_a["bits_per_char"],
                "bits_per_char_group_gate": gate_a["bits_per_char"],
                "routing_recall_at_k": gate_a["recall_at_k"],
            }
        rows.append(row)
    return rows


def _spec_all(cfg) -> gate_lib.GateSpec:
    """A spec with no end layers: 'full' mode needs only its shape."""
    e = cfg.model.moe.num_experts
    return gate_lib.GateSpec(np.ones((cfg.model.num_layers, e), bool), 0, (), (),
                             np.zeros((cfg.model.num_layers, e), np.float32))
