"""ec2moe-jax: end-cloud Mixture-of-Experts inference in JAX/Flax, after EC2MoE.

The names a user types, importable from the top level::

    from ec2moe_jax import load_config, MoELM, load_hf            # configs and models
    from ec2moe_jax import schedule, make_replanner, build_instance  # the route-aware scheduler
    from ec2moe_jax import build_stages, EndEngine, CloudEngine     # the split pipeline

They are resolved on first use (PEP 562), so ``import ec2moe_jax`` (and ``ec2moe --help``)
does not import JAX: the command line sets JAX's device count before JAX starts.
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

_API = {
    "ExperimentConfig": "ec2moe_jax.config",
    "ModelConfig": "ec2moe_jax.config",
    "MoEConfig": "ec2moe_jax.config",
    "load_config": "ec2moe_jax.config",
    "MoELM": "ec2moe_jax.models",
    "generate": "ec2moe_jax.models",
    "load_hf": "ec2moe_jax.models",
    "Instance": "ec2moe_jax.scheduler",
    "Plan": "ec2moe_jax.scheduler",
    "build_instance": "ec2moe_jax.scheduler",
    "schedule": "ec2moe_jax.scheduler",
    "make_replanner": "ec2moe_jax.scheduler.replan",
    "PipelinePlan": "ec2moe_jax.pipeline.plans",
    "load_plan": "ec2moe_jax.pipeline.plans",
    "build_stages": "ec2moe_jax.pipeline",
    "EndEngine": "ec2moe_jax.pipeline",
    "CloudEngine": "ec2moe_jax.pipeline",
    "load_run": "ec2moe_jax.training",
    "train": "ec2moe_jax.training",
}
__all__ = sorted(_API)


def __getattr__(name: str) -> Any:
    if name not in _API:
        raise AttributeError(f"module 'ec2moe_jax' has no attribute {name!r}")
    value = getattr(importlib.import_module(_API[name]), name)
    globals()[name] = value  # resolved once
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_API))
