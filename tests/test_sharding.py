"""Meshes, the end/cloud split, and sharded execution equal to unsharded (8 CPU devices)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import assert_close
from jax.sharding import NamedSharding, PartitionSpec

from ec2moe_jax.config import MeshConfig, MoEConfig, load_config
from ec2moe_jax.layers import MoEBlock
from ec2moe_jax.models import MoELM
from ec2moe_jax.sharding import (
    batch_sharding,
    hop,
    logical_to_spec,
    make_mesh,
    param_shardings,
    split_end_cloud,
    training_mesh,
    unbox,
    use_mesh,
)


def test_end_cloud_split_is_disjoint_and_shaped(devices):
    end, cloud = split_end_cloud(MeshConfig(end_devices=2, cloud_devices=6, cloud_expert_shards=2))
    assert dict(end.shape) == {"data": 2, "expert": 1}
    assert dict(cloud.shape) == {"data": 3, "expert": 2}
    assert not set(end.devices.flat) & set(cloud.devices.flat)
    assert set(end.devices.flat) | set(cloud.devices.flat) == set(devices[:8])


def test_split_larger_than_available_devices_is_named(devices):
    with pytest.raises(ValueError, match="end_devices=4 \\+ cloud_devices=8 = 12 exceeds the 8"):
        split_end_cloud(MeshConfig(end_devices=4, cloud_devices=8, cloud_expert_shards=2))
    with pytest.raises(ValueError, match="train_expert_shards=3"):
        training_mesh(MeshConfig(train_expert_shards=3))


def test_logical_rules_map_and_never_reuse_a_mesh_axis():
    assert logical_to_spec(("expert", "embed", "expert_mlp")) == PartitionSpec("expert", None,
                                                                               None)
    assert logical_to_spec(("batch", "batch")) == PartitionSpec("data", None)


def _sharded_vs_unsharded(module, variables_boxed, args, mesh, **kwargs):
    params = unbox(variables_boxed)
    ref = module.apply(params, *args, **kwargs)
    shardings = param_shardings(variables_boxed, mesh)
    sharded_params = jax.device_put(params, shardings)
    sharded_args = tuple(jax.device_put(a, batch_sharding(mesh, a.ndim)) for a in args)
    with use_mesh(mesh):
        out = jax.jit(lambda p, *a: module.apply(p, *a, **kwargs))(sharded_params, *sharded_args)
    return ref, out, sharded_params


@pytest.mark.parametrize("dispatch", ["einsum", "gather"])
def test_moe_block_sharded_over_8_devices_equals_unsharded(devices, dispatch):
    mesh = make_mesh(devices[:8], data=2, expert=4)
    cfg = MoEConfig(num_experts=8, top_k=2, expert_dim=16, dispatch=dispatch)
    x = jax.random.normal(jax.random.key(0), (4, 16, 32))
    block = MoEBlock(cfg)
    boxed = block.init(jax.random.key(1), x)
    ref, out, params = _sharded_vs_unsharded(block, boxed, (x,), mesh)
    assert_close(out[0], ref[0], atol=1e-5)
    w = params["params"]["w_gate"]
    assert w.sharding.spec == PartitionSpec("expert", None, None)
    assert len(w.addressable_shards) == 8 and w.addressable_shards[0].data.shape == (2, 32, 16)


def test_full_lm_sharded_over_8_devices_equals_unsharded(devices):
    mesh = make_mesh(devices[:8], data=4, expert=2)
    cfg = load_config("tiny").model
    model = MoELM(cfg)
    tokens = jax.random.randint(jax.random.key(2), (4, 24), 0, 256)
    boxed = model.init(jax.random.key(3), tokens)
    ref, out, params = _sharded_vs_unsharded(model, boxed, (tokens,), mesh)
    assert_close(out, ref, atol=1e-5)
    assert params["params"]["layer_0"]["moe"]["w_down"].sharding.spec[0] == "expert"


def test_param_sharding_rejects_indivisible_expert_axis(devices):
    mesh = make_mesh(devices[:6], data=2, expert=3)
    boxed = MoEBlock(MoEConfig(num_experts=8)).init(jax.random.key(0), jnp.ones((1, 4, 8)))
    with pytest.raises(ValueError, match="not divisible by mesh axis 'expert' of size 3"):
        param_shardings(boxed, mesh)


def test_hop_moves_hidden_state_from_end_to_cloud(devices):
    end, cloud = split_end_cloud(MeshConfig())
    h = jax.device_put(jnp.arange(24.0).reshape(6, 4), NamedSharding(end, PartitionSpec("data")))
    moved = hop(h, NamedSharding(cloud, PartitionSpec("data")))
    assert set(moved.sharding.device_set) == set(cloud.devices.flat)
    np.testing.assert_array_equal(moved, h)


def test_hop_onto_a_mesh_shards_each_leaf_by_its_own_batch(devices):
    # The cloud mesh has a 3-way 'data' axis: a [6, 4] leaf is split over it, a [1, 4] leaf
    # (one request) and a scalar (a KV cache's write index) are replicated; values unchanged.
    _, cloud = split_end_cloud(MeshConfig())
    tree = {"six": np.arange(24.0).reshape(6, 4), "one": np.ones((1, 4)), "index": np.int32(5)}
    moved = hop(tree, cloud)
    assert moved["six"].sharding.spec == PartitionSpec("data", None)
    assert moved["one"].sharding.spec == PartitionSpec(None, None)
    assert moved["index"].sharding.spec == PartitionSpec()
    assert all(set(x.sharding.device_set) == set(cloud.devices.flat) for x in moved.values())
    jax.tree.map(np.testing.assert_array_equal, moved, tree)
