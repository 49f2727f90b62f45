"""Configs load, validate early, and name the bad value in the message."""

import dataclasses

import pytest

from ec2moe_jax.config import MoEConfig, from_dict, load_config


@pytest.mark.parametrize("name", ["tiny", "small", "base"])
def test_named_configs_load(name):
    cfg = load_config(name)
    assert cfg.name == name and cfg.model.moe.num_experts % cfg.mesh.cloud_expert_shards == 0


def test_experts_not_divisible_by_expert_shards():
    with pytest.raises(ValueError, match="num_experts=6 not divisible by expert_shards=4"):
        MoEConfig(num_experts=6).validate(expert_shards=4)
    with pytest.raises(ValueError, match="not divisible"):
        load_config("tiny").replace(mesh__cloud_expert_shards=3, mesh__cloud_devices=6)


def test_top_k_above_num_experts():
    with pytest.raises(ValueError, match=r"top_k=9 must lie in \[1, num_experts=8\]"):
        load_config("tiny").replace(model__moe__top_k=9)


def test_unknown_fields_and_configs_are_named():
    d = {"model": {"d_modle": 3}}
    with pytest.raises(ValueError, match="d_modle"):
        from_dict("x", d)
    with pytest.raises(ValueError, match="unknown config 'nope'"):
        load_config("nope")


def test_other_validation_messages():
    cfg = load_config("tiny")
    with pytest.raises(ValueError, match="seq_len=128 exceeds model.max_seq_len=64"):
        cfg.replace(train__seq_len=128)
    with pytest.raises(ValueError, match="dispatch='fast'"):
        cfg.replace(model__moe__dispatch="fast")
    with pytest.raises(ValueError, match="moe_layers"):
        cfg.replace(model__moe_layers=(5,))
    with pytest.raises(ValueError, match="warmup_steps"):
        cfg.replace(train__warmup_steps=100)


def test_replace_keeps_other_fields_and_configs_are_frozen():
    cfg = load_config("tiny")
    new = cfg.replace(model__moe__top_k=1, train__steps=7)
    assert new.model.moe.top_k == 1 and new.train.steps == 7
    assert new.model.d_model == cfg.model.d_model and cfg.model.moe.top_k == 2
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.model.d_model = 3
