"""The quality column: the base -> small plan mapping on hand-computed cases, and measured
bits/char of mapped keys through the real pipeline on a tiny workdir (random parameters,
saved as a params-only run), cached per checkpoint."""

import os

import jax
import numpy as np
import pytest

from ec2moe_jax.bench.quality import (
    QualityKey,
    evaluate_keys,
    full_model_key,
    heldout_windows,
    map_plan,
)
from ec2moe_jax.config import load_config

BASE = load_config("base").model  # 12 layers, layer 0 dense, 32 experts top-2, D 1024
SMALL = load_config("small").model  # 4 layers all MoE, 8 experts top-2, D 256


def _map(split, resident=32, swap=False, codec="bf16", gate="group"):
    res = [resident] * 12 if isinstance(resident, int) else resident
    return map_plan(split, res, swap, codec, gate=gate, base_cfg=BASE, small_cfg=SMALL)


def test_cloud_only_and_end_only():
    assert _map(0, 0, codec="int8-r256") == QualityKey(0, 8, "masked", "bf16", False)
    assert _map(0, 0) == full_model_key(SMALL)
    # End-only keeps every layer on the end: no boundary, so no codec; half the experts.
    assert _map(12, 16, codec="int8-r256") == QualityKey(4, 4, "group", "bf16", False)
    assert _map(12, 32, gate="group") == QualityKey(4, 8, "masked", "bf16", False)


@pytest.mark.parametrize("split, want", [
    (1, 1),  # only the dense layer 0: m = 0, clipped up to 1 (still a split)
    (4, 2),  # MoE layers 1..3: ceil(3 / 11 * 4) = ceil(1.09) = 2
    (7, 3),  # m = 6: ceil(24 / 11 = 2.18) = 3
    (11, 3),  # m = 10: ceil(3.64) = 4, clipped to L' - 1 = 3 so the codec still applies
])
def test_split_depth_rounds_up_and_stays_a_split(split, want):
    key = _map(split, 32, codec="int8-r256")
    assert key.end_layers == want
    assert key.codec == "int8-r64"


def test_resident_fraction_rounds_down_over_end_moe_layers():
    # Layer 0 is dense: its count (0) is ignored. End MoE layers 1..3 keep 16, 12, 32 of 32:
    # the smallest fraction 12/32 maps to floor(0.375 * 8) = 3 of 8.
    res = [0, 16, 12, 32] + [0] * 8
    assert _map(4, res).resident == 3
    assert _map(4, [0, 16, 16, 16] + [0] * 8).resident == 4  # exact 4.0 stays 4
    assert _map(4, [0, 31, 31, 31] + [0] * 8).resident == 7  # 7.75 rounds down
    assert _map(4, [0, 2, 2, 2] + [0] * 8).resident == 2  # 0.5 floors to 0, raised to top_k
    assert _map(1, 0).resident == 8  # no MoE layer on the end: nothing dropped


def test_swap_makes_every_expert_usable_and_masked_when_nothing_dropped():
    assert _map(12, 4, swap=True) == QualityKey(4, 8, "masked", "bf16", True)
    assert _map(4, 32, gate="group").gate == "masked"
    assert _map(4, 8, gate="group").gate == "group"
    assert _map(4, 8, gate="masked").gate == "masked"


def test_measured_budget_keys_count_slots_and_keep_the_expert_format():
    # End MoE layers 1..3 keep 30, 31, 32 of 32 (split 4 maps to 2 small end layers): the
    # smallest share 30/32 of the small end's 2 x 8 = 16 slots is 15, handed out by routing
    # mass.
    res = [0, 30, 31, 32] + [0] * 8
    key = map_plan(4, res, False, "int8-r256", gate="group", base_cfg=BASE, small_cfg=SMALL,
                   experts="int4", by_slots=True)
    assert (key.end_layers, key.end_slots, key.resident, key.experts) == (2, 15, 7, "int4")
    assert key.label() == "L2-n7-group-int8-r64-s15-xint4"
    # Nothing dropped: no slot count, every expert, the router.
    full = map_plan(4, [0, 32, 32, 32] + [0] * 8, False, "bf16", gate="group", base_cfg=BASE,
                    small_cfg=SMALL, experts="int4", by_slots=True)
    assert (full.end_slots, full.resident, full.gate) == (0, 8, "masked")
    # Never fewer than top_k per end layer: 2/32 would floor to 1 slot of 16.
    low = map_plan(4, [0, 2, 2, 2] + [0] * 8, False, "bf16", gate="group", base_cfg=BASE,
                   small_cfg=SMALL, by_slots=True)
    assert low.end_slots == 2 * 2
    assert QualityKey.from_json(key.to_json()) == key
    with pytest.raises(ValueError, match="int3"):
        QualityKey(1, 4, "group", experts="int3")


@pytest.mark.parametrize("base, small", [
    ("int8-r256", "int8-r64"), ("int4-r384", "int4-r96"), ("int8-r32", "int8-r8"),
    ("int8-r1", "int8-r1"), ("bf16", "bf16"), ("none", "bf16"),
])
def test_codec_rank_scales_with_width(base, small):
    assert _map(4, codec=base).codec == small


def test_bad_inputs_name_the_value():
    with pytest.raises(ValueError, match="12 counts"):
        map_plan(4, [32] * 11, False, "bf16", gate="group", base_cfg=BASE, small_cfg=SMALL)
    with pytest.raises(ValueError, match="12 counts"):
        _map(4, 33)
    with pytest.raises(ValueError, match="gate='hlggn'"):
        _map(4, gate="hlggn")
    with pytest.raises(ValueError, match="codec='fp8'"):
        _map(4, codec="fp8")
    with pytest.raises(ValueError, match="split=13"):
        _map(13)
    with pytest.raises(ValueError, match="gate='topk'"):
        QualityKey(1, 4, "topk")


def test_key_json_round_trip_and_labels_are_distinct():
    keys = [QualityKey(2, 4, "group", "int8-r64"), QualityKey(2, 4, "masked", "int8-r64"),
            QualityKey(4, 8, "masked", "bf16", True), QualityKey(4, 8, "masked", "bf16")]
    assert [QualityKey.from_json(k.to_json()) for k in keys] == keys
    assert len({k.label() for k in keys}) == len(keys)
    # Keys cached before the codec vocabulary said "none" for bf16: read as "bf16".
    old = {"end_layers": 4, "resident": 8, "gate": "masked", "codec": "none"}
    assert QualityKey.from_json(old) == keys[3] and keys[3].label() == "L4-n8-masked-bf16"


# -- measured, on a tiny params-only workdir -------------------------------------------------

WINDOWS, WINDOW_LEN = 4, 32


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory, devices):
    from conftest import FIXTURES

    from ec2moe_jax.data import prepare_splits
    from ec2moe_jax.models.lm import MoELM, init_params
    from ec2moe_jax.routing import save_stats
    from ec2moe_jax.sharding import unbox
    from ec2moe_jax.training import collect_stats
    from ec2moe_jax.training.loop import save_params

    paths = ",".join(os.path.join(FIXTURES, "corpus", n) for n in ("a.txt", "b.txt"))
    cfg = load_config("tiny").replace(data__source=paths, data__val_fraction=0.1,
                                      data__test_fraction=0.1)
    wd = str(tmp_path_factory.mktemp("quality_run"))
    model = MoELM(cfg.model)
    params = unbox(init_params(model, jax.random.key(0)))
    save_params(cfg, wd, params)
    splits = prepare_splits(cfg.data)
    # Routing statistics of a short pass (load_run's default pass is sized for real runs).
    save_stats(collect_stats(model, params, splits.train, batches=2, batch_size=4, seq_len=32),
               os.path.join(wd, "routing_stats.npz"))
    return {"workdir": wd, "model": model, "params": params, "splits": splits, "cfg": cfg}


def _bits_unsplit(run) -> float:
    texts = heldout_windows(run["splits"].test, WINDOWS, WINDOW_LEN)
    logits = run["model"].apply({"params": run["params"]}, texts[:, :-1])
    lp = np.take_along_axis(np.asarray(jax.nn.log_softmax(logits, -1)), texts[:, 1:, None],
                            -1)
    return float(-lp.mean() / np.log(2))


def test_evaluate_keys_measures_gates_and_caches(tiny_run, tmp_path, monkeypatch):
    from ec2moe_jax.pipeline import runtime

    wd, cache = tiny_run["workdir"], str(tmp_path / "quality.json")
    full = full_model_key(tiny_run["cfg"].model)
    group = QualityKey(1, 4, "group", "int8-r8")  # layer 0 on the end keeps 4 of 8 experts
    masked = QualityKey(1, 4, "masked", "int8-r8")  # the same mask, router only
    kw = {"windows": WINDOWS, "window_len": WINDOW_LEN, "cache": cache, "progress": False}
    # The group key trains (2 steps) and saves a gate for the mask; the masked key, evaluated
    # after it, must still use the router although a gate is now saved for its mask.
    out = evaluate_keys(wd, [full, group, masked, full], gate_steps=2, **kw)
    assert list(out) == [full, group, masked]
    assert abs(out[full]["bits_per_char"] - _bits_unsplit(tiny_run)) < 1e-3
    assert out[full]["gate"].startswith("router (every expert")
    assert "trained here (2 steps" in out[group]["gate"]
    assert out[masked]["gate"] == "router (masked top-k, gate disabled)"
    assert out[group]["bits_per_char"] != out[masked]["bits_per_char"]
    assert out[masked]["plan"]["split"] == 1 and out[masked]["plan"]["resident"] == [4, 0]
    assert 0 < out[masked]["routing_mass_covered_per_end_layer"][0] < 1
    assert out[masked]["codec_source"].startswith("PCA-initialised")

    # Second call: every key is cached, so nothing is prepared (or even loaded).
    def refuse(*a, **k):
        raise AssertionError("a cached key was evaluated again")

    monkeypatch.setattr(runtime, "prepare", refuse)
    monkeypatch.setattr("ec2moe_jax.training.load_run", refuse)
    again = evaluate_keys(wd, [masked, group, full], gate_steps=2, **kw)
    assert again == {k: out[k] for k in (masked, group, full)}
    # A masked key does not depend on gate_steps (shared entry); a group key does.
    assert evaluate_keys(wd, [masked], gate_steps=5, **kw)[masked] == out[masked]
    with pytest.raises(AssertionError, match="evaluated again"):
        evaluate_keys(wd, [group], gate_steps=5, **kw)


def test_slot_keys_with_quantised_experts_run_through_the_pipeline(tiny_run, tmp_path):
    wd = tiny_run["workdir"]
    kw = {"windows": WINDOWS, "window_len": WINDOW_LEN, "cache": str(tmp_path / "q.json"),
          "progress": False, "gate_steps": 0}
    float_key = QualityKey(1, 7, "masked", "bf16", end_slots=7)  # layer 0: 7 of 8 experts
    int4_key = QualityKey(1, 7, "masked", "bf16", experts="int4", end_slots=7)
    out = evaluate_keys(wd, [float_key, int4_key], **kw)
    assert out[int4_key]["plan"]["experts"] == "int4"
    assert out[float_key]["plan"]["resident"] == [7, 0]
    # Same mask, quantised end experts: a different (and finite) figure.
    assert np.isfinite(out[int4_key]["bits_per_char"])
    assert out[int4_key]["bits_per_char"] != out[float_key]["bits_per_char"]


def test_group_gates_use_gate_false_returns_the_router(tiny_run, tmp_path):
    from ec2moe_jax.pipeline.runtime import group_gates

    model, params, cfg = tiny_run["model"], tiny_run["params"], tiny_run["cfg"].model
    allowed = np.ones((cfg.num_layers, cfg.moe.num_experts), bool)
    allowed[0, 4:] = False
    freq = np.full((cfg.num_layers, cfg.moe.num_experts), 1 / cfg.moe.num_experts)
    kw = {"workdir": str(tmp_path), "train_tokens": tiny_run["splits"].train}
    gates, source = group_gates(model, params, allowed, 1, freq, steps=1, **kw)
    assert gates is not None and "trained here" in source
    assert group_gates(model, params, allowed, 1, freq, **kw)[0] is not None  # saved: reloaded
    assert group_gates(model, params, allowed, 1, freq, use_gate=False, **kw) == (
        None, "router (masked top-k, gate disabled)")
