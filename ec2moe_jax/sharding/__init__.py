"""Meshes, the end/cloud split, logical axis rules."""

from ec2moe_jax.sharding.mesh import (
    LOGICAL_RULES,
    MESH_AXES,
    active_mesh,
    batch_sharding,
    constrain,
    hop,
    logical_to_spec,
    make_mesh,
    param_shardings,
    replicated,
    split_end_cloud,
    training_mesh,
    unbox,
    use_mesh,
)

__all__ = [
    "LOGICAL_RULES",
    "MESH_AXES",
    "active_mesh",
    "batch_sharding",
    "constrain",
    "hop",
    "logical_to_spec",
    "make_mesh",
    "param_shardings",
    "replicated",
    "split_end_cloud",
    "training_mesh",
    "unbox",
    "use_mesh",
]
