"""Hardware-aware local expert selection (pure): which experts an end device keeps."""

from ec2moe_jax.selection.select import (
    Selection,
    covered_mass,
    layers_within_budget,
    mixed_precision,
    select_experts,
    select_for_profile,
    selection_order,
)

__all__ = [
    "Selection",
    "covered_mass",
    "layers_within_budget",
    "mixed_precision",
    "select_experts",
    "select_for_profile",
    "selection_order",
]
