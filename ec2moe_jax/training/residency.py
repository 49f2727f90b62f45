"""Random expert residency masks for residency-aware training (*ours*).

Shape legend: L layers, E experts.

A step that routes the leading layers over a random subset of experts teaches the LM to
degrade gracefully when an end device holds only some of them (see
:mod:`ec2moe_jax.training.adapt`). Pre-training draws one mask per step from (seed, step)
(:func:`step_residency`), the fine-tune from its own generator.
"""

from __future__ import annotations

import numpy as np

from ec2moe_jax.config import ModelConfig, TrainConfig


def random_residency(rng: np.random.Generator, moe_layers: list[int], num_layers: int,
                     num_experts: int, min_resident: int, full_prob: float = 0.25,
                     max_layers: int | None = None) -> np.ndarray:
    """<bool>[L, E]: with probability ``full_prob`` every expert; otherwise the first
    1..``max_layers`` (default all) of the MoE layers ``moe_layers`` (ascending layer
    indices; dense layers have no experts to drop) each keep a random subset of
    ``min_resident``..E-1 experts."""
    allowed = np.ones((num_layers, num_experts), bool)
    if rng.random() < full_prob or not moe_layers:
        return allowed
    for layer in moe_layers[:rng.integers(1, (max_layers or len(moe_layers)) + 1)]:
        keep = rng.permutation(num_experts)[: rng.integers(min_resident, num_experts)]
        allowed[layer] = False
        allowed[layer, keep] = True
    return allowed


def step_residency(train: TrainConfig, model: ModelConfig, step: int) -> np.ndarray:
    """<bool>[L, E] the expert mask of pre-training step ``step`` (all True with probability
    ``1 - train.residency_prob``; else the leading 1..``train.residency_layers`` MoE layers
    masked); a function of (seed, step) only, so a resumed run draws the masks it would
    have drawn."""
    rng = np.random.default_rng((train.seed, step, 0x5E5))
    return random_residency(rng, moe_layer_indices(model), model.num_layers,
                            model.moe.num_experts, min_resident=model.moe.top_k,
                            full_prob=1.0 - train.residency_prob,
                            max_layers=train.residency_layers)


def moe_layer_indices(model: ModelConfig) -> list[int]:
    """The model's MoE layers, ascending."""
    return [i for i in range(model.num_layers) if model.is_moe_layer(i)]
