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


def random_residency(rng: np.random.Generator, num_layers: int, num_experts: int,
                     min_resident: int, full_prob: float = 0.25,
                     max_layers: int | None = None) -> np.ndarray:
    """<bool>[L, E]: with probability ``full_prob`` every expert; otherwise the first
    1..``max_layers`` (default L) layers each keep a random subset of ``min_resident``..E-1
    experts."""
    allowed = np.ones((num_layers, num_experts), bool)
    if rng.random() < full_prob:
        return allowed
    for layer in range(rng.integers(1, (max_layers or num_layers) + 1)):
        keep = rng.permutation(num_experts)[: rng.integers(min_resident, num_experts)]
        allowed[layer] = False
        allowed[layer, keep] = True
    return allowed


def step_residency(train: TrainConfig, model: ModelConfig, step: int) -> np.ndarray:
    """<bool>[L, E] the expert mask of pre-training step ``step`` (all True with probability
    ``1 - train.residency_prob``); a function of (seed, step) only, so a resumed run draws
    the masks it would have drawn."""
    rng = np.random.default_rng((train.seed, step, 0x5E5))
    return random_residency(rng, model.num_layers, model.moe.num_experts,
                            min_resident=model.moe.top_k, full_prob=1.0 - train.residency_prob,
                            max_layers=train.residency_layers)
