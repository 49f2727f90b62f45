"""Route-aware end-cloud pipeline scheduler (PO-ECC, *ours*): cost model, heuristic,
baselines, exhaustive optimum for small instances, re-planning and calibration. Pure
functions over pytrees of arrays."""

from ec2moe_jax.scheduler.calibrate import Calibration, load_calibration, predict, this_cpu
from ec2moe_jax.scheduler.candidates import baseline_indices, candidates
from ec2moe_jax.scheduler.heuristic import schedule
from ec2moe_jax.scheduler.instance import (
    CodecOption,
    ResidencyQuality,
    build_instance,
    codec_options,
    zipf_frequencies,
)
from ec2moe_jax.scheduler.model import Instance, Plan, Terms, evaluate, plan_terms

__all__ = [
    "Calibration",
    "CodecOption",
    "Instance",
    "Plan",
    "ResidencyQuality",
    "Terms",
    "baseline_indices",
    "build_instance",
    "candidates",
    "codec_options",
    "evaluate",
    "load_calibration",
    "plan_terms",
    "predict",
    "schedule",
    "this_cpu",
    "zipf_frequencies",
]
