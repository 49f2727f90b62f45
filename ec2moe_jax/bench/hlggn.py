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

import numpy as np

from ec2moe_jax.models.costs import model_costs
from ec2moe_jax.profiles import DeviceProfile, device
from ec2moe_jax.selection import select_for_profile
from ec2moe_jax.training import gate as gate_lib
from ec2moe_jax.training.adapt import adapt_to_residency
from ec2moe_jax.training.workdir import load_run


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


def run(workdir: str, *, num_end_layers: int = 2, gate_steps: int = 100,
        eval_batches: int = 30, adapt_steps: int = 400, progress: bool = True) -> list[dict]:
    """The HL-GGN table: one dict per profile (see README for the keys)."""
    setup, params, splits, freq = load_run(workdir, progress=progress)
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
