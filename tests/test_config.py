"""Configs load, validate early, and name the bad value in the message: every field checked
for type, sign and finiteness through one validation path (a table over all fields, the
issue's examples, and a fuzz test)."""

import dataclasses
import math
import re

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

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


# ---- every field validated for type, sign and finiteness, the field named (issue 18) ----

from ec2moe_jax import config as config_lib  # noqa: E402
from ec2moe_jax.config import apply_overrides, check_field, require_byte_vocab  # noqa: E402

SECTIONS = {"data": config_lib.DataConfig, "model": config_lib.ModelConfig,
            "model.moe": MoEConfig, "mesh": config_lib.MeshConfig,
            "train": config_lib.TrainConfig}
NUMERIC = {"int", "float"}


def _fields():
    """(dotted key, dataclass, field) of every config field but the nested moe section."""
    return [(f"{section}.{f.name}", cls, f) for section, cls in SECTIONS.items()
            for f in dataclasses.fields(cls) if f.name != "moe"]


def _bad_values(f) -> list:
    """Values field ``f`` must refuse: wrong types for its annotation, non-finite floats, and
    one value past each bound of its rule."""
    options = {o.strip() for o in str(f.type).split("|")}
    bad = []
    if "int" in options:
        bad += [1.5, 32.0, "8", True]
    if "float" in options:
        bad += [float("nan"), float("inf"), float("-inf"), "0.1", True]
    if "str" in options:
        bad += [5, None]
    if "bool" in options:
        bad += [1, "true", None]
    if "tuple[int, ...]" in options:
        bad += [[True], "x", (1.5,)]
    rule = f.metadata
    for word, delta in (("ge", -1), ("gt", 0), ("le", 1), ("lt", 0)):
        if word in rule:
            bad.append(rule[word] + delta if options & NUMERIC else None)
    if "gt" in rule:
        bad.append(rule["gt"] - 1)
    if "choices" in rule:
        bad.append("no-such-choice")
    if rule.get("nonempty"):
        bad.append("")
    if "None" not in options:
        bad.append(None)
    return [v for v in bad if not (v is None and "None" in options)]


@pytest.mark.parametrize("key,cls,field", _fields(), ids=[k for k, _, _ in _fields()])
def test_every_field_refuses_wrong_type_sign_and_non_finite_values_naming_it(key, cls, field):
    options = {o.strip() for o in str(field.type).split("|")}
    if options & NUMERIC:  # every number has a rule: a new field without one fails here
        assert {"ge", "gt", "le", "lt"} & set(field.metadata), f"{key} has no bound"
    cfg = load_config("tiny")
    section, _, name = key.rpartition(".")
    bad = _bad_values(field)
    assert bad, key
    for value in bad:
        # The one validation path, three ways in: the field check, a config file's dict,
        # and a --set override (its text parsed as a Python literal).
        with pytest.raises(ValueError, match=re.escape(key)):
            check_field(cls, name, value)
        nested = {"moe": {name: value}} if section == "model.moe" else {name: value}
        with pytest.raises(ValueError, match=re.escape(key)):
            from_dict("x", {section.split(".")[0]: nested})
        if isinstance(value, float) and not math.isfinite(value):
            text = "1e999" if value > 0 else "-1e999"  # a literal that parses to +-inf
            if math.isnan(value):
                continue  # no Python literal is NaN; the dict path above covers it
        else:
            text = repr(value)
        with pytest.raises(ValueError, match=re.escape(key)):
            apply_overrides(cfg, [f"{key}={text}"])


@pytest.mark.parametrize("override,message", [
    ("model.norm_eps=0.0", "model.norm_eps=0.0 must be > 0"),
    ("model.norm_eps=-1e-6", "model.norm_eps=-1e-06 must be > 0"),
    ("model.rope_theta=0.0", "model.rope_theta=0.0 must be > 0"),
    ("model.rope_theta=-10000.0", "model.rope_theta=-10000.0 must be > 0"),
    ("train.learning_rate=1e999", "train.learning_rate=inf must be a finite number"),
    ("model.head_dim=-4", "model.head_dim=-4 must be >= 1"),
    ("model.num_kv_heads=-1", "model.num_kv_heads=-1 must be >= 1"),
    ("model.moe.capacity_factor=1e999", "model.moe.capacity_factor=inf must be a finite"),
    ("model.d_model=32.0", "model.d_model=32.0 must be int, got float"),
    ("model.moe.num_experts='8'", "model.moe.num_experts='8' must be int, got str"),
])
def test_issue_examples_fail_naming_the_field(override, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        load_config("tiny", [override])


def test_nan_in_a_config_file_is_named_with_the_file(tmp_path):
    path = tmp_path / "mine.py"
    path.write_text("def get_config():\n    return {'model': {'moe': {'z_loss_coef': "
                    "float('nan')}}}\n")
    with pytest.raises(ValueError, match=r"mine\.py.*model\.moe\.z_loss_coef=nan must be a "
                                         "finite number"):
        load_config(str(path))
    path.write_text("x = 1\n")
    with pytest.raises(ValueError, match="must define get_config"):
        load_config(str(path))


def test_vocab_below_the_byte_tokenizer_is_refused_for_byte_data(tmp_path, fixture_splits):
    from ec2moe_jax.training import train

    cfg = load_config("tiny", ["model.vocab_size=100"])  # valid for an imported model ...
    with pytest.raises(ValueError, match="model.vocab_size=100 is below the byte tokenizer's "
                                         "256 ids"):  # ... never for byte text
        train(cfg, str(tmp_path), splits=fixture_splits, progress=False, stop_at=1)
    require_byte_vocab(load_config("tiny").model, "a test")


_VALUES = st.one_of(
    st.none(), st.booleans(), st.integers(-10**6, 10**12),
    st.floats(allow_nan=True, allow_infinity=True), st.text(max_size=6),
    st.lists(st.integers(-3, 9), max_size=4), st.dictionaries(st.text(max_size=3),
                                                              st.integers(), max_size=2))


@settings(max_examples=200, deadline=None, derandomize=True)
@given(st.sampled_from([k for k, _, _ in _fields()]), _VALUES, st.text(max_size=12))
def test_fuzz_config_fields_only_raise_documented_errors(key, value, text):
    # Any value in a config file, and any --set text, either gives a validated config or a
    # ValueError naming what is wrong; never a TypeError, a crash or a silent garbage value.
    section, _, name = key.rpartition(".")
    nested = {"moe": {name: value}} if section == "model.moe" else {name: value}
    try:
        cfg = from_dict("fuzz", {section.split(".")[0]: nested})
    except ValueError as e:
        assert str(e)
    else:
        got = config_lib.config_value(cfg, key)
        assert got == value or (isinstance(value, list) and got == tuple(value))
    try:
        apply_overrides(load_config("tiny"), [f"{key}={text}"])
    except ValueError as e:
        assert str(e)
