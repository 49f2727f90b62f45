"""Simulator validation harness: RealTiming runs the real stages but, with a fixed timer,
composes exactly the hand-computed timeline; its bytes and outputs are the executor's; the
simulator with real stages equals the executor for one device with every request at t = 0;
the chosen load keeps the busiest resource at its target. Tiny config, random parameters."""

import jax
import numpy as np
import pytest
from conftest import assert_close

from ec2moe_jax.bench.sim import (
    CLOUD_ONLY,
    END_ONLY,
    SPLIT,
    DevicePlan,
    ModelTiming,
    device_plans,
    poisson_arrivals,
)
from ec2moe_jax.bench.sim_validation import (
    PLANS,
    RealTiming,
    offered_rate,
    scheduler_plan,
    simulate,
)
from ec2moe_jax.pipeline import BandwidthTrace, Channel, Link, fixed_times
from ec2moe_jax.pipeline import generate as ex_generate
from ec2moe_jax.pipeline import score as ex_score
from ec2moe_jax.profiles import LinkProfile

LINK = LinkProfile("test", bandwidth_bps=1e6, rtt_s=0.1)
TIMES = {"end": 0.01, "hop": 0.004, "cloud": 0.02, "end_prefill": 0.01, "end_step": 0.001,
         "cloud_prefill": 0.02, "cloud_step": 0.002}
KINDS = {0: CLOUD_ONLY, 1: SPLIT, 2: END_ONLY}


@pytest.fixture(scope="module")
def world(tiny_pipeline):
    v = tiny_pipeline["cfg"].model.vocab_size
    texts = np.asarray(jax.random.randint(jax.random.key(1), (4, 9), 0, v), np.int32)
    return {**tiny_pipeline, "texts": texts}


def _channel():
    trace = BandwidthTrace.constant(LINK.bandwidth_bps)
    return Channel(Link("up", trace, LINK.rtt_s), Link("down", trace, LINK.rtt_s))


def _run(stages, texts, arrivals, batch, gen, horizon=1.0):
    rt = RealTiming(stages, texts, gen_tokens=gen, timer=fixed_times(TIMES))
    plan = DevicePlan(stages.split, batch, KINDS[stages.split])
    return rt, simulate(rt, [plan], [np.asarray(arrivals)], horizon, gen, LINK)


def test_fixed_stage_times_compose_the_hand_computed_timeline(world):
    # One device, split 1 (float32 hidden state, D = 32), scoring T = 8 tokens, micro-batch 1,
    # requests at t = 0 and t = 1 ms over 1 Mbit/s with 100 ms RTT. Message sizes: up =
    # 24-byte header + 8 x 32 float32 + 8 target ids = 1080 bytes (8.64 ms on the wire),
    # down = 24 + 8 float32 scores = 56 bytes (0.448 ms). Cloud = hop 4 ms + stage 20 ms.
    rt, res = _run(world["stages"][1], world["texts"][:2], [0.0, 0.001], 1, 0)
    up, down, half = 8 * 1080 / 1e6, 8 * 56 / 1e6, 0.05
    # Request 0: end [0, 10 ms], uplink [10 ms, +up], cloud on arrival, downlink at once.
    cloud0 = 0.01 + up + half + 0.024
    done0 = cloud0 + down + half
    # Request 1 waits for the end until 10 ms, its uplink is free at 20 ms, but it reaches
    # the cloud while request 0 is still being served: it queues until cloud0.
    assert 0.02 + up + half < cloud0
    done1 = cloud0 + 0.024 + down + half
    got = sorted((r.arrival, r.done) for r in res.requests)
    assert_close([d for _, d in got], [done0, done1], rtol=0, atol=1e-12)
    assert [r.ttft for r in sorted(res.requests, key=lambda r: r.arrival)] == pytest.approx(
        [done0, done1 - 0.001], abs=1e-12)
    assert all(r.bytes_up == 1080 and r.bytes_down == 56 for r in res.requests)
    assert rt.seconds == {"end": [0.01, 0.01], "hop": [0.004, 0.004], "cloud": [0.02, 0.02]}
    assert not rt._jobs  # every job's state was released


@pytest.mark.parametrize("split", [0, 1, 2])
def test_scoring_bytes_and_outputs_equal_the_executor(world, split):
    # Three requests at t = 0 in micro-batches of 2: a full job and one flushed at the
    # horizon with one request; bytes per request and log-probabilities are the executor's.
    stages, texts = world["stages"][split], world["texts"][:3]
    rt, res = _run(stages, texts, [0.0, 0.0, 0.0], 2, 0)
    lp, rep = ex_score(stages, texts, channel=_channel(), micro_batch=2,
                       timer=fixed_times(TIMES))
    assert_close(np.stack([rt.outputs[i] for i in range(3)]), lp)
    mine = sorted((r.bytes_up, r.bytes_down) for r in res.requests)
    theirs = sorted((r.bytes_up, r.bytes_down) for r in rep.requests)
    assert mine == theirs
    assert sum(r.bytes_up for r in res.requests) == rep.bytes_up
    if split < 2:
        assert rep.bytes_up > 0


@pytest.mark.parametrize("split", [0, 1, 2])
def test_decoding_with_real_stages_equals_the_executor(world, split):
    # One device, two requests at t = 0, micro-batch 1, 3 generated tokens under fixed stage
    # times: the simulator composes the executor's timeline (latency, TTFT), sends the same
    # bytes and generates the same tokens.
    stages, prompts = world["stages"][split], world["texts"][:2, :5]
    rt, res = _run(stages, prompts, [0.0, 0.0], 1, 3)
    toks, rep = ex_generate(stages, prompts, 3, channel=_channel(), micro_batch=1,
                            timer=fixed_times(TIMES))
    np.testing.assert_array_equal(np.stack([rt.outputs[i] for i in range(2)]), toks)
    sim = sorted((r.done, r.ttft, r.bytes_up, r.bytes_down) for r in res.requests)
    ex = sorted((r.latency_s, r.ttft_s, r.bytes_up, r.bytes_down) for r in rep.requests)
    assert_close(np.array(sim), np.array(ex), rtol=0, atol=1e-12)
    assert not rt._jobs


def test_chosen_load_keeps_the_busiest_resource_at_its_target():
    # Two devices of the small model's split plan under the cost model: over a long run the
    # cloud's busy fraction is the target utilisation the rate was chosen for.
    import os

    from ec2moe_jax.config import load_config
    from ec2moe_jax.models.costs import model_costs
    from ec2moe_jax.scheduler import build_instance, codec_options, this_cpu

    cfg = load_config("small").model
    results = os.path.join(os.path.dirname(__file__), os.pardir, "results")  # committed
    prof, end_cal, cloud_cal = this_cpu(cfg, os.path.join(results, "calibration_cpu.json"),
                                        os.path.join(results, "pipeline_calibration.json"))
    codecs = [c for c in codec_options(cfg.d_model, os.path.join(results, "codec_sweep.json"))
              if c.name in ("bf16", "int8-r64")]
    costs = model_costs(cfg)
    freq = np.full((int(costs.is_moe.sum()), cfg.moe.num_experts), 1.0)
    inst = build_instance(costs, freq, [prof] * 2, prof, [LINK] * 2, [1.0] * 2,
                          prompt_tokens=128, gen_tokens=0, calibration=end_cal,
                          cloud_calibration=cloud_cal, codecs=codecs, batch_sizes=(1, 2))
    plan = scheduler_plan("split", inst, [c.name for c in codecs])
    assert np.asarray(plan.resident)[0].tolist() == [4, 4, 0, 0]
    timing = ModelTiming(inst)
    plans = device_plans(inst, plan, timing.register(plan))
    assert [(p.split, p.batch, p.kind) for p in plans] == [(2, 1, SPLIT)] * 2
    rate, util = offered_rate(timing, 0, plans, LINK.bandwidth_bps, 0.6)
    busiest = max(util, key=util.get)
    assert util[busiest] == pytest.approx(0.6)
    horizon = 4000 / (2 * rate)
    res = simulate(timing, plans, poisson_arrivals([rate] * 2, horizon, 0), horizon, 0, LINK)
    if busiest in ("cloud", "end"):
        share = res.busy[busiest] / horizon / (1 if busiest == "cloud" else 2)
        assert share == pytest.approx(0.6, abs=0.05)
    assert PLANS["split"][3] == 1  # micro-batch 1: the shape the calibration was fitted at
