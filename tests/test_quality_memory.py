"""The quality-against-memory benchmark: budgets in exact bytes, infeasible points named, a
resumable run, and the full-budget point equal to the full model."""

import json

import numpy as np
import pytest
from conftest import fixture_config, random_workdir

from ec2moe_jax.bench import quality_memory as qm
from ec2moe_jax.layers import QuantSpec


def test_budget_slots_count_quantised_bytes():
    cfg = fixture_config().model  # tiny: 2 layers, 8 experts of 3 x 32 x 32
    # One end layer: 25% of 8 bf16 experts is 2 of them; int8 (1 byte + scales) fits 3,
    # int4 7 (8 x 0.25 / (0.25 + scales) = 7.x).
    assert qm.budget_slots(cfg, 0.25, QuantSpec(), 1) == 2
    assert qm.budget_slots(cfg, 0.25, QuantSpec(8), 1) == 3
    assert qm.budget_slots(cfg, 0.25, QuantSpec(4), 1) == 7
    assert qm.budget_slots(cfg, 1.0, QuantSpec(4), 1) == 8  # never more than exist
    assert qm.budget_slots(cfg, 1.0, QuantSpec(), 2) == 16


def test_resident_mask_hands_out_slots_by_routing_mass():
    cfg = fixture_config().model
    freq = np.array([[0.4, 0.3, 0.1, 0.1, 0.05, 0.05, 0.0, 0.0],
                     [0.2, 0.2, 0.2, 0.1, 0.1, 0.1, 0.05, 0.05]])
    assert qm.resident_mask(cfg, freq, 1, 2) is None  # two end layers, one expert
    m = qm.resident_mask(cfg, freq, 5, 2)
    # top_k = 2 each first, then the largest remaining frequency (layer 1's third, 0.2).
    assert m[0].tolist() == [True, True] + [False] * 6
    assert m[1].tolist() == [True, True, True] + [False] * 5
    one = qm.resident_mask(cfg, freq, 3, 1)
    assert one[0].sum() == 3 and one[1].all()  # the cloud layer keeps every expert


def test_mixed_layout_stores_every_expert_before_adding_bits():
    cfg = fixture_config().model
    freq = np.array([[0.3, 0.2, 0.1, 0.1, 0.1, 0.1, 0.05, 0.05],
                     [0.125] * 8])
    allowed, bits, stored = qm.end_layout(cfg, freq, 0.25, "mixed", 1)
    # 25% of 8 bf16 experts: all 8 fit in int2 (1/8 + scales each), the rest upgrades the
    # most-used to int4: the budget is never exceeded and nothing is dropped.
    assert allowed[0].all() and set(bits[0].tolist()) <= {2, 4} and (bits[0] == 4).any()
    assert bits[0][0] == 4 and bits[1].tolist() == [16] * 8  # cloud layer untouched
    bf16 = QuantSpec().expert_bytes(cfg.d_model, cfg.moe.expert_dim)
    assert stored <= 0.25 * 8 * bf16
    uniform = qm.end_layout(cfg, freq, 0.25, "int4", 1)
    assert uniform[0][0].sum() == 7 and stored > uniform[2]


def test_variant_names_are_checked():
    assert qm.Variant.parse("plain/int4/gate").experts == "int4"
    with pytest.raises(ValueError, match="lm='big'"):
        qm.Variant.parse("big/bf16/gate")
    with pytest.raises(ValueError, match="lm/experts/router"):
        qm.Variant.parse("plain-bf16")


@pytest.mark.slow
def test_run_is_resumable_and_the_full_budget_is_the_full_model(tmp_path, monkeypatch):
    wd = random_workdir(str(tmp_path / "run"))[0]
    out = str(tmp_path / "qm.json")
    variants = (qm.Variant.parse("plain/bf16/masked"), qm.Variant.parse("plain/int4/gate"),
                qm.Variant.parse("residency/bf16/gate"), qm.Variant.parse("plain/mixed/gate"))
    kw = {"variants": variants, "fractions": (0.1, 0.25, 1.0), "num_end_layers": 1,
          "gate_steps": 2, "eval_batches": 1, "progress": False}
    entry = qm.run_model("tiny", {"plain": wd, "residency": None}, out, **kw)
    assert entry["skipped"] == ["residency/bf16/gate"]  # no residency-trained workdir
    points = {(p["variant"], p["fraction"]): p for p in entry["points"]}
    assert len(points) == 9
    mixed = points[("plain/mixed/gate", 0.25)]  # every expert stored: no gate to train
    assert mixed["resident_per_layer"] == [8] and mixed["gate_train_seconds"] == 0
    assert set(mixed["experts_by_bits"]) <= {"2", "4", "8"}
    # 10% of 8 bf16 experts is none: infeasible, and said so.
    assert not points[("plain/bf16/masked", 0.1)]["feasible"]
    assert "cannot give each" in points[("plain/bf16/masked", 0.1)]["reason"]
    full = points[("plain/bf16/masked", 1.0)]
    assert full["bits_per_char"] == pytest.approx(entry["full"]["plain"], rel=1e-6)
    assert full["relative_increase"] == pytest.approx(0.0, abs=1e-6)
    int4 = points[("plain/int4/gate", 0.25)]
    assert int4["slots"] == 7 and int4["resident_per_layer"] == [7]
    assert int4["gate_train_seconds"] > 0  # an expert was dropped: the gate was trained
    assert points[("plain/int4/gate", 1.0)]["gate_train_seconds"] == 0  # all fit: the router
    # A second run measures nothing again (gate training would fail here).
    from ec2moe_jax.training import gate as gate_lib

    monkeypatch.setattr(gate_lib, "train_gates", lambda *a, **k: pytest.fail("re-measured"))
    again = qm.run_model("tiny", {"plain": wd, "residency": None}, out, **kw)
    assert again["points"] == entry["points"]
    record = json.load(open(out))
    assert qm.best_by_fraction(record["models"]["tiny"])[1.0]["relative_increase"] == pytest.approx(
        0.0, abs=1e-3)
