"""The scheduler's measured quality budget (ResidencyQuality) and quantised end experts:
the charged loss is a pessimistic step function, a plan over the budget is refused, the
heuristic keeps enough experts, and int4 experts let the same memory hold more."""

import jax.numpy as jnp
import numpy as np
import pytest

from ec2moe_jax.config import ModelConfig, MoEConfig
from ec2moe_jax.layers import QuantSpec
from ec2moe_jax.models.costs import model_costs
from ec2moe_jax.profiles import DeviceProfile, LinkProfile, device
from ec2moe_jax.scheduler import ResidencyQuality, build_instance, schedule
from ec2moe_jax.scheduler.instance import zipf_frequencies
from ec2moe_jax.scheduler.model import Plan
from ec2moe_jax.scheduler.plan import evaluate_jit

# Made-up figures of the shape bench-quality-memory measures: dropping half the experts
# costs 40%, a quarter 6%, one in eight 2%, none 0 (noise made 0.875 look worse than 0.75:
# the envelope must not let it).
TABLE = ResidencyQuality(fractions=(0.5, 0.75, 0.875, 1.0), loss=(0.40, 0.015, 0.02, 0.0),
                         experts="int4", source="test")


def test_charged_loss_is_a_pessimistic_step_function():
    e = 8
    got = TABLE.loss_at(np.arange(e + 1), e)
    # Below the smallest measured share: unknown, refused (inf). 4/8 -> 0.40; 5/8 still 0.40
    # (no interpolation upward); 6/8 -> max(0.015, 0.02 measured at 7/8) = 0.02; 7/8 -> 0.02.
    assert np.isinf(got[:4]).all()
    np.testing.assert_allclose(got[4:], [0.40, 0.40, 0.02, 0.02, 0.0])
    with pytest.raises(ValueError, match="must increase"):
        ResidencyQuality((0.5, 0.5), (0.1, 0.0))
    with pytest.raises(ValueError, match="equal-length"):
        ResidencyQuality((0.5,), (0.1, 0.0))


def test_from_quality_memory_reads_one_method():
    record = {"models": {"small": {
        "config": {"num_experts": 8}, "settings": {"num_end_layers": 2},
        "points": [{"variant": "plain/int4/gate", "feasible": True, "slots": 15,
                    "resident_fraction": 15 / 16, "relative_increase": 0.01},
                   {"variant": "plain/int4/gate", "feasible": True, "slots": 16,
                    "resident_fraction": 1.0, "relative_increase": -0.001},
                   {"variant": "plain/bf16/gate", "feasible": True, "slots": 4,
                    "resident_fraction": 0.25, "relative_increase": 0.9},
                   {"variant": "plain/int4/gate", "feasible": False, "slots": 1}]}}}
    q = ResidencyQuality.from_quality_memory(record, "small", "plain/int4/gate")
    assert q.fractions == (15 / 16, 1.0) and q.loss == (0.01, 0.0)  # a gain counts as 0
    assert q.experts == "int4"
    with pytest.raises(ValueError, match="measured: \\['plain/bf16/gate', 'plain/int4/gate'\\]"):
        ResidencyQuality.from_quality_memory(record, "small", "residency/int4/gate")
    with pytest.raises(ValueError, match="model 'big'"):
        ResidencyQuality.from_quality_memory(record, "big", "plain/int4/gate")
    old = {"models": {"small": {"points": [{"variant": "plain/int4/gate", "feasible": True,
                                            "slots": 15, "relative_increase": 0.01}]}}}
    with pytest.raises(ValueError, match="lack 'resident_fraction'.*rerun ec2moe bench-qua"):
        ResidencyQuality.from_quality_memory(old, "small", "plain/int4/gate")
    with pytest.raises(ValueError, match="int3"):
        ResidencyQuality((1.0,), (0.0,), experts="int3")


def _costs(experts=8):
    cfg = ModelConfig(d_model=256, num_layers=3, num_heads=4, d_ff=512,
                      moe=MoEConfig(num_experts=experts, top_k=2, expert_dim=512))
    return cfg, model_costs(cfg, "bfloat16")


def _instance(memory, *, quality=TABLE, end_experts=None, budget=0.03):
    cfg, costs = _costs()
    end = DeviceProfile("end", memory_bytes=memory, peak_flops=2e12, mem_bandwidth=5e10)
    return build_instance(costs, zipf_frequencies(3, 8, 1.2), [end],
                          device("t4").with_load(0.95), [LinkProfile("lte", 2e7, 0.05)],
                          [2.0], min_end_layers=1, quality=quality, quality_budget=budget,
                          end_experts=end_experts)


def _plan(split, resident):
    r = jnp.asarray([resident + [0] * (3 - len(resident))], jnp.int32)
    zero = jnp.zeros(1, jnp.int32)
    return Plan(jnp.asarray([split], jnp.int32), r, jnp.zeros(1, bool), zero, zero)


def test_a_plan_over_the_measured_budget_is_refused():
    inst = _instance(1e9)  # memory for everything: only quality decides
    # 6 of 8 experts: charged 2% <= 3%, feasible; 5 of 8: charged 40%, refused; swapping
    # every expert in from storage lifts the constraint.
    ok = evaluate_jit(inst, _plan(1, [6]))
    bad = evaluate_jit(inst, _plan(1, [5]))
    assert float(ok["terms"].penalty[0]) == 0
    assert float(bad["terms"].penalty[0]) > 0
    tight = _instance(1e9, budget=0.01)  # 1%: only all 8 experts pass
    assert float(evaluate_jit(tight, _plan(1, [6]))["terms"].penalty[0]) > 0
    assert float(evaluate_jit(tight, _plan(1, [8]))["terms"].penalty[0]) == 0
    # The heuristic's plan keeps its end layers within the budget.
    # Nothing dropped (or nothing on the end) is charged no loss, never a negative one.
    from ec2moe_jax.scheduler.plan import describe

    assert describe(inst, _plan(0, []))["quality_loss"] == [0.0]
    assert describe(inst, _plan(1, [6]))["quality_loss"] == pytest.approx([0.02])
    plan, info = schedule(inst)
    s = int(plan.split[0])
    assert bool(info["feasible"]) and s >= 1
    charged = TABLE.loss_at(np.asarray(plan.resident[0, :s]), 8)
    assert (charged <= 0.03).all() or bool(plan.swap[0])


def test_int4_experts_fit_more_in_the_same_memory():
    cfg, costs = _costs()
    fixed = costs.embed_bytes + costs.fixed_bytes[:1].sum()
    memory = fixed + 3.2 * costs.expert_bytes  # 3 bf16 experts, 12 int4 ones
    kv_room = 4e6
    bf16 = _instance(memory + kv_room, quality=None)
    quant = _instance(memory + kv_room, quality=None, end_experts="int4")
    # The instance counts the int4 format's exact bytes, as model_costs does.
    assert float(quant.end_expert_bytes) == pytest.approx(
        model_costs(cfg, experts=QuantSpec(4)).expert_bytes)
    assert quant.end_experts == "int4" and bf16.end_experts == "bf16"
    plan = _plan(1, [8])
    # All 8 experts of layer 0: over the memory in bf16, within it in int4.
    assert float(evaluate_jit(bf16, plan)["terms"].end_bytes[0]) > memory + kv_room
    assert float(evaluate_jit(quant, plan)["terms"].end_bytes[0]) < memory + kv_room
    assert float(evaluate_jit(quant, plan)["terms"].penalty[0]) == 0


def test_the_evaluation_plans_on_the_measured_budget():
    from ec2moe_jax.bench import evaluation as ev
    from ec2moe_jax.bench.strategies import EC2MOE
    from ec2moe_jax.scheduler import Calibration

    sweep = {"sweep": [{"rank": 64, "bits": "int8", "relative_increase_vs_bf16": 0.004}]}
    table = ResidencyQuality((0.9375, 1.0), (0.015, 0.001), experts="int4")
    ctx = ev.Context.default(Calibration(), sweep, quality=table, quality_budget=0.02,
                             codec_budget=0.01)
    assert ctx.end_experts == "int4"
    s = ev.setting(ctx, ev.Regime("private-score-512", "t4", 2, 20.0), 5.0, 30.0, seed=0)
    assert (s.live.score_kind, s.live.end_experts) == ("quality_loss", "int4")
    assert (s.lossless.score_kind, s.lossless.end_experts) == ("coverage", "bf16")
    assert float(s.live.end_expert_bytes) < 0.3 * float(s.live.expert_bytes)
    run = ev.run_strategy(ctx, EC2MOE, s, 4, 30.0, window=(9.0, 30.0))
    for plan in run.plans:  # every end layer within the 2% budget (or swapping)
        for d in range(2):
            split, res = int(plan.split[d]), np.asarray(plan.resident[d])
            moe = [i for i in range(split) if ctx.costs.is_moe[i]]
            if moe and not bool(plan.swap[d]):
                assert (table.loss_at(res[moe], ctx.costs.num_experts) <= 0.02).all()
