"""Device meshes, the end/cloud split, and logical-to-physical axis rules.

Code names *logical* axes ('batch', 'expert', 'embed', ...); the rules (config data) map them
onto the *physical* mesh axes ('data', 'expert'). A mesh is rectangular, so the end and the
cloud are two separate :class:`jax.sharding.Mesh` objects over disjoint devices, and moving a
hidden state from one to the other is an explicit :func:`hop` (one jit cannot span two meshes).
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Iterator, Sequence

import flax.linen as nn
import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from ec2moe_jax.config import MeshConfig

MESH_AXES = ("data", "expert")

# Logical axis -> physical mesh axis (None = replicated). About ten logical names in all.
LOGICAL_RULES: tuple[tuple[str, str | None], ...] = (
    ("batch", "data"),
    ("expert", "expert"),
    ("length", None),
    ("embed", None),
    ("mlp", None),
    ("expert_mlp", None),
    ("heads", None),
    ("kv_heads", None),
    ("head_dim", None),
    ("vocab", None),
)


def _auto_axis_types(n: int) -> dict:
    # jax.make_mesh defaults to Explicit axes; we want GSPMD's Auto propagation everywhere.
    axis_type = getattr(jax.sharding, "AxisType", None)
    return {"axis_types": (axis_type.Auto,) * n} if axis_type is not None else {}


def make_mesh(devices: Sequence[jax.Device], data: int, expert: int) -> Mesh:
    """A ('data', 'expert') mesh of shape ``(data, expert)`` over ``devices``."""
    if data * expert != len(devices):
        raise ValueError(f"mesh {data=} x {expert=} needs {data * expert} devices, "
                         f"got {len(devices)}")
    grid = np.asarray(devices, dtype=object).reshape(data, expert)
    return Mesh(grid, MESH_AXES, **_auto_axis_types(2))


def training_mesh(cfg: MeshConfig, devices: Sequence[jax.Device] | None = None) -> Mesh:
    """All devices as (data = n / expert_shards, expert = ``cfg.train_expert_shards``)."""
    devices = list(jax.devices() if devices is None else devices)
    shards = cfg.train_expert_shards
    if len(devices) % shards:
        raise ValueError(
            f"train_expert_shards={shards} does not divide the {len(devices)} available "
            "devices; set mesh.train_expert_shards to a divisor"
        )
    return make_mesh(devices, len(devices) // shards, shards)


def split_end_cloud(
    cfg: MeshConfig, devices: Sequence[jax.Device] | None = None
) -> tuple[Mesh, Mesh]:
    """Splits the devices into an end mesh (first ``end_devices``) and a cloud mesh (next).

    The end mesh is (data = end_devices, expert = 1): end experts are few and replicated; the
    cloud mesh is (data = cloud_devices / cloud_expert_shards, expert = cloud_expert_shards).
    """
    devices = list(jax.devices() if devices is None else devices)
    need = cfg.end_devices + cfg.cloud_devices
    if need > len(devices):
        raise ValueError(
            f"end_devices={cfg.end_devices} + cloud_devices={cfg.cloud_devices} = {need} "
            f"exceeds the {len(devices)} available devices; on CPU set "
            f"JAX_NUM_CPU_DEVICES={need} before starting Python, or shrink the split"
        )
    if cfg.cloud_devices % cfg.cloud_expert_shards:
        raise ValueError(f"cloud_devices={cfg.cloud_devices} not divisible by "
                         f"cloud_expert_shards={cfg.cloud_expert_shards}")
    end = make_mesh(devices[: cfg.end_devices], cfg.end_devices, 1)
    cloud_devices = devices[cfg.end_devices : need]
    shards = cfg.cloud_expert_shards
    cloud = make_mesh(cloud_devices, cfg.cloud_devices // shards, shards)
    return end, cloud


def logical_to_spec(
    names: Sequence[str | None], rules: Sequence[tuple[str, str | None]] = LOGICAL_RULES
) -> PartitionSpec:
    """Maps logical axis names to a PartitionSpec; each mesh axis is used at most once."""
    table = dict(rules)
    used: set[str] = set()
    out = []
    for name in names:
        axis = table.get(name) if name is not None else None
        if axis is not None and axis in used:
            axis = None
        if axis is not None:
            used.add(axis)
        out.append(axis)
    return PartitionSpec(*out)


def _is_box(x: object) -> bool:
    return isinstance(x, nn.LogicallyPartitioned)


def param_shardings(boxed_params, mesh: Mesh, rules=LOGICAL_RULES):
    """NamedShardings for a tree of (possibly abstract) logically partitioned params.

    Unannotated leaves are replicated. A dimension not divisible by its mesh axis raises
    with the parameter's logical names and shape in the message.
    """

    def one(leaf):
        if not _is_box(leaf):
            return NamedSharding(mesh, PartitionSpec())
        spec = logical_to_spec(leaf.names, rules)
        for dim, axis in zip(leaf.value.shape, spec, strict=False):
            if axis is not None and dim % mesh.shape[axis]:
                raise ValueError(
                    f"parameter with logical axes {leaf.names} and shape {leaf.value.shape}: "
                    f"dimension {dim} not divisible by mesh axis {axis!r} of size "
                    f"{mesh.shape[axis]}"
                )
        return NamedSharding(mesh, spec)

    return jax.tree.map(one, boxed_params, is_leaf=_is_box)


def unbox(tree):
    """Strips logical-partitioning boxes, leaving plain arrays."""
    return nn.meta.unbox(tree)


def batch_sharding(mesh: Mesh, ndim: int = 2, batch: int | None = None) -> NamedSharding:
    """Sharding of a [B, ...] input batch: B over 'data', the rest replicated.

    With ``batch`` given, B stays replicated where 'data' does not divide it (one request on
    a 3-way 'data' axis); a scalar (``ndim == 0``, e.g. a KV cache's write index) is
    replicated.
    """
    if ndim == 0:
        return NamedSharding(mesh, PartitionSpec())
    axis = "data" if batch is None or batch % mesh.shape["data"] == 0 else None
    return NamedSharding(mesh, PartitionSpec(axis, *([None] * (ndim - 1))))


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, PartitionSpec())


def hop(tree, dest: Mesh | jax.sharding.Sharding):
    """The explicit transfer of a pytree between meshes (end to cloud, cloud to end, or from
    host arrays): a ``jax.device_put`` of every leaf, since one jit cannot span two meshes.

    Args:
      tree: a pytree of arrays (jax or NumPy; ``None`` leaves stay ``None``).
      dest: one sharding for every leaf, or a mesh: then every [B, ...] leaf is placed by
        :func:`batch_sharding` with its own B (over 'data' where that divides B, else
        replicated) and every scalar is replicated.
    """
    if not isinstance(dest, Mesh):
        return jax.device_put(tree, dest)

    def one(x):
        ndim = np.ndim(x)
        return jax.device_put(x, batch_sharding(dest, ndim, np.shape(x)[0] if ndim else None))

    return jax.tree.map(one, tree)


_state = threading.local()


@contextlib.contextmanager
def use_mesh(mesh: Mesh, rules=LOGICAL_RULES) -> Iterator[Mesh]:
    """Within this context (at trace time) :func:`constrain` pins activations to ``mesh``."""
    prev = getattr(_state, "ctx", None)
    _state.ctx = (mesh, tuple(rules))
    try:
        yield mesh
    finally:
        _state.ctx = prev


def active_mesh() -> Mesh | None:
    """The mesh of the enclosing :func:`use_mesh` (at trace time), or None outside one."""
    ctx = getattr(_state, "ctx", None)
    return None if ctx is None else ctx[0]


def constrain(x: jax.Array, names: Sequence[str | None]) -> jax.Array:
    """Sharding constraint by logical names; a no-op outside :func:`use_mesh`.

    Axes whose mesh size does not divide the dimension stay unconstrained, so the same model
    code runs on any mesh (e.g. one decode token on a two-way 'data' axis).
    """
    ctx = getattr(_state, "ctx", None)
    if ctx is None:
        return x
    mesh, rules = ctx
    spec = logical_to_spec(names, rules)
    spec = PartitionSpec(
        *(a if a is None or dim % mesh.shape[a] == 0 else None
          for dim, a in zip(x.shape, spec, strict=False))
    )
    return jax.lax.with_sharding_constraint(x, NamedSharding(mesh, spec))
