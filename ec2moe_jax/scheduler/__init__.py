"""Route-aware end-cloud pipeline scheduler (PO-ECC, *ours*): cost model, heuristic,
baselines, exhaustive optimum for small instances, re-planning and calibration. Pure
functions over pytrees of arrays."""

from ec2moe_jax.scheduler.candidates import baseline_indices, candidates
from ec2moe_jax.scheduler.heuristic import schedule
from ec2moe_jax.scheduler.instance import (
    Calibration,
    CodecOption,
    build_instance,
    codec_options,
    load_calibration,
    zipf_frequencies,
)
from ec2moe_jax.scheduler.model import Instance, Plan, Terms, evaluate, plan_terms

__all__ = [
    "Calibration",
    "CodecOption",
    "Instance",
    "Plan",
    "Terms",
    "baseline_indices",
    "build_instance",
    "candidates",
    "codec_options",
    "evaluate",
    "load_calibration",
    "plan_terms",
    "schedule",
    "zipf_frequencies",
]
