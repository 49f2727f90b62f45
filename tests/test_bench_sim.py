"""The evaluation harness's pieces: traces, the discrete-event simulator (hand-computed
timelines, agreement with the M/G/1 cost model), the throughput bound, the strategies and
the report tables."""

import dataclasses

import numpy as np
import pytest

from ec2moe_jax.bench import sim
from ec2moe_jax.bench.traces import Drop, LteParams, lte_trace
from ec2moe_jax.pipeline.link import BandwidthTrace

# A codec sweep record of the shape `ec2moe codec-sweep` writes (made-up values in the range
# measured at D = 256), so the tests do not read the repository's results.
SWEEP = {"sweep": [{"rank": r, "bits": b, "relative_increase_vs_bf16": q} for r, b, q in (
    (128, "int8", 0.0004), (64, "int8", 0.004), (48, "int8", 0.012), (64, "int4", 0.012))]}


# -- traces -------------------------------------------------------------------------------
def test_trace_mean_is_exact_on_a_hand_example():
    tr = BandwidthTrace((0.0, 1.0, 3.0), (10.0, 20.0, 40.0))
    assert tr.mean_bps(0.0, 1.0) == pytest.approx(10.0)
    assert tr.mean_bps(0.5, 2.0) == pytest.approx((0.5 * 10 + 1.0 * 20) / 1.5)
    assert tr.mean_bps(2.0, 5.0) == pytest.approx((1 * 20 + 2 * 40) / 3)
    assert tr.mean_bps(4.0, 4.0) == 40.0


def test_lte_trace_statistics_and_drop():
    p = LteParams(20e6, cv=0.5, corr_s=3.0, step_s=0.5)
    tr = lte_trace(p, 4000.0, seed=1)
    bps = np.asarray(tr.bps)
    assert tr.mean_bps(0, 4000.0) == pytest.approx(20e6, rel=0.1)
    assert bps.min() >= p.floor * p.mean_bps and bps.max() <= p.ceil * p.mean_bps
    assert np.std(bps) / np.mean(bps) == pytest.approx(0.5, abs=0.12)
    dropped = lte_trace(p, 100.0, seed=1, drops=(Drop(20.0, 10.0, 0.1),))
    plain = lte_trace(p, 100.0, seed=1)
    assert dropped.mean_bps(20, 30) == pytest.approx(0.1 * plain.mean_bps(20, 30))
    assert dropped.mean_bps(40, 100) == pytest.approx(plain.mean_bps(40, 100))
    c = BandwidthTrace.constant(8e6, (Drop(2.0, 1.0, 0.5),))
    assert c.mean_bps(0, 4) == pytest.approx((3 * 8e6 + 4e6) / 4)
    with pytest.raises(ValueError, match="factor"):
        Drop(0.0, 1.0, 0.0)


# -- the simulator on hand-computed timelines -----------------------------------------------
@dataclasses.dataclass
class FixedTiming:
    end_s: float = 0.2
    cloud_s: float = 0.3
    up: float = 1000.0
    down: float = 100.0
    calls: list = dataclasses.field(default_factory=list)

    def end(self, job, step):
        self.calls.append(("end", job.device, step))
        return self.end_s

    def cloud(self, job, step):
        self.calls.append(("cloud", job.device, step))
        return self.cloud_s

    def up_bytes(self, job, step):
        return self.up

    def down_bytes(self, job, step):
        return self.down


def _simulate(kind, arrivals, gen=0, devices=1, batch=1, timing=None, bps=8e4, rtt=0.02,
              stream_after_first=False):
    timing = timing or FixedTiming()
    plans = [sim.DevicePlan({"split": 2, "cloud-only": 0, "end-only": 4}[kind], batch, kind)
             ] * devices
    s = sim.Simulator(timing, sim.StaticController(plans), [BandwidthTrace.constant(bps)] *
                      devices, [BandwidthTrace.constant(bps)] * devices, [rtt] * devices, gen,
                      stream_after_first=stream_after_first)
    return s.run([np.asarray(a, float) for a in arrivals], 10.0), timing


def test_split_scoring_timeline_by_hand():
    # Device: end 0.2 s; uplink 1000 B at 80 kbit/s = 0.1 s + 10 ms; cloud 0.3 s; downlink
    # 100 B = 0.01 s + 10 ms. Requests at 0 and 0.1: the second waits for the end (FIFO).
    res, _ = _simulate("split", [[0.0, 0.1]])
    first = 0.2 + 0.1 + 0.01 + 0.3 + 0.01 + 0.01
    # Second: end 0.2-0.4, uplink 0.4-0.5 (+10 ms), cloud waits until the first is done
    # (0.61) and runs to 0.91, downlink to 0.93.
    second = 0.91 + 0.01 + 0.01
    done = sorted(r.done for r in res.requests)
    assert done == pytest.approx([first, second])
    assert [r.done - r.arrival for r in sorted(res.requests, key=lambda r: r.arrival)] == \
        pytest.approx([first, second - 0.1])


def test_shared_cloud_is_fifo_across_devices():
    # Two cloud-only devices, both requests at t=0: the uplinks run in parallel, the cloud
    # serves one after the other.
    res, _ = _simulate("cloud-only", [[0.0], [0.0]], devices=2)
    arrive = 0.1 + 0.01
    done = sorted(r.done for r in res.requests)
    assert done == pytest.approx([arrive + 0.3 + 0.02, arrive + 0.6 + 0.02])


@dataclasses.dataclass
class BatchedTiming(FixedTiming):
    wait_s: float = 0.5

    def cloud_wait(self, job, step):
        return self.wait_s


def test_cloud_wait_delays_the_job_without_occupying_the_cloud():
    # Two split devices, requests at 0: both end stages 0-0.2, uplinks to 0.31; the cloud
    # serves them 0.31-0.61 and 0.61-0.91 as without a wait (its time is not taken), and
    # each reply leaves the cloud 0.5 s after its share ends (a batched step's whole length).
    res, _ = _simulate("split", [[0.0], [0.0]], devices=2, timing=BatchedTiming())
    done = sorted(r.done for r in res.requests)
    assert done == pytest.approx([0.61 + 0.5 + 0.02, 0.91 + 0.5 + 0.02])
    assert res.busy["cloud"] == pytest.approx(0.6)


def test_decoding_round_trips_and_cloud_only_streaming():
    # Split decoding: each of G=3 tokens is a full round trip (prefill + 2 steps).
    res, timing = _simulate("split", [[0.0]], gen=3)
    trip = 0.2 + 0.11 + 0.3 + 0.02
    (r,) = res.requests
    assert r.ttft == pytest.approx(trip)
    assert r.done == pytest.approx(3 * trip)
    assert r.tpot == pytest.approx(trip)
    assert [c[2] for c in timing.calls if c[0] == "end"] == [0, 1, 2]
    # Cloud-only: the cloud runs the next step as soon as it finishes one; tokens stream.
    res, timing = _simulate("cloud-only", [[0.0]], gen=3)
    (r,) = res.requests
    assert r.ttft == pytest.approx(0.11 + 0.3 + 0.02)
    assert r.done == pytest.approx(0.11 + 3 * 0.3 + 0.02)
    assert not [c for c in timing.calls if c[0] == "end"]
    # A client that asks for the stream after its first token: one more uplink (0.11 s).
    res, _ = _simulate("cloud-only", [[0.0]], gen=3, stream_after_first=True)
    (r,) = res.requests
    assert r.ttft == pytest.approx(0.11 + 0.3 + 0.02)
    assert r.done == pytest.approx(0.11 + 0.3 + 0.02 + 0.11 + 2 * 0.3 + 0.02)
    # End-only never touches the link.
    res, _ = _simulate("end-only", [[0.0, 0.0]], gen=2)
    # Both prefills queue at t=0 (0-0.2, 0.2-0.4); the steps follow in FIFO order.
    assert sorted(r.done for r in res.requests) == pytest.approx([0.6, 0.8])
    assert all(r.bytes_up == 0 for r in res.requests)


def test_micro_batches_form_when_full_and_flush_at_the_horizon():
    res, timing = _simulate("end-only", [[0.0, 1.0, 2.0]], batch=2)
    done = sorted(r.done for r in res.requests)
    # Requests 0 and 1 run together when the second arrives; the third is flushed at 10 s.
    assert done == pytest.approx([1.2, 1.2, 10.2])


def test_closed_loop_measures_capacity():
    timing = FixedTiming(cloud_s=0.01, up=10.0, down=10.0)
    plans = [sim.DevicePlan(0, 1, sim.CLOUD_ONLY)]
    s = sim.Simulator(timing, sim.StaticController(plans), [BandwidthTrace.constant(1e9)],
                      [BandwidthTrace.constant(1e9)], [0.0], 0)
    res = s.run_closed(8, 20.0)
    assert res.summary(window=(5.0, 20.0))["throughput_rps"] == pytest.approx(100.0, rel=0.01)


def test_simulator_agrees_with_the_mg1_cost_model_at_moderate_load():
    from ec2moe_jax.config import load_config
    from ec2moe_jax.models.costs import model_costs
    from ec2moe_jax.profiles import LinkProfile, device
    from ec2moe_jax.scheduler import build_instance, evaluate, zipf_frequencies
    from ec2moe_jax.scheduler.plan import baseline_plans

    costs = model_costs(load_config("base").model)
    freq = zipf_frequencies(11, 32, 1.0)
    n, rate = 2, 20.0
    inst = build_instance(costs, freq, [device("laptop-cpu").with_memory(4 * 2**30)] * n,
                          device("t4"), [LinkProfile("l", 50e6, 0.03)] * n, [rate] * n,
                          prompt_tokens=128)
    plan = baseline_plans(inst)["cloud_only"]
    timing = sim.ModelTiming(inst)
    v = timing.register(plan)
    s = sim.Simulator(timing, sim.StaticController(sim.device_plans(inst, plan, v)),
                      [BandwidthTrace.constant(50e6)] * n, [BandwidthTrace.constant(50e6)] * n,
                      [0.03] * n, 0)
    res = s.run(sim.poisson_arrivals([rate] * n, 100.0, seed=3), 100.0)
    predicted = evaluate(inst, plan)
    assert 0.3 < float(predicted["cloud_utilisation"]) < 0.9
    assert res.summary()["latency_mean_s"] == pytest.approx(
        float(predicted["mean_latency_s"]), rel=0.1)


# -- bound, strategies, scheduler objective --------------------------------------------
@pytest.fixture(scope="module")
def small_setting():
    from ec2moe_jax.bench import evaluation as ev
    from ec2moe_jax.scheduler import Calibration

    ctx = ev.Context.default(Calibration(), SWEEP)
    rg = ev.Regime("private-score-512", "t4", 2, 20.0)
    return ctx, rg, ev.setting(ctx, rg, 5.0, 30.0, seed=0)


def test_bound_is_at_least_every_strategys_capacity(small_setting):
    from ec2moe_jax.bench import evaluation as ev
    from ec2moe_jax.bench.bounds import throughput_bound

    ctx, rg, s = small_setting
    means = np.asarray([tr.mean_bps(0, 30.0) for tr in s.up])
    bound = throughput_bound(s.live, means)["requests_per_s"]
    for name in ("ec2moe", "end-only", "best-split"):
        got = ev.run_strategy(ctx, name, s, 16, 30.0, window=(9.0, 30.0))
        assert got.summary["throughput_rps"] <= bound * 1.02, name
    # Privacy: split 0 is not allowed, so the bound with privacy is at most the one without.
    free = throughput_bound(s.live.replace(min_end_layers=s.live.min_end_layers * 0), means)
    assert free["requests_per_s"] >= bound


def test_realise_fits_live_memory_and_baselines_have_their_shape(small_setting):
    from ec2moe_jax.bench import strategies
    from ec2moe_jax.scheduler.heuristic import schedule
    from ec2moe_jax.scheduler.model import end_memory

    _, _, s = small_setting
    spec_plan, _ = schedule(s.spec)
    run = strategies.realise(s.live, spec_plan)
    b = np.asarray(s.live.batch)[np.asarray(run.batch)]
    assert np.all(np.asarray(end_memory(s.live, run, b)) <= np.asarray(s.live.end_mem) + 1)
    assert np.all(np.asarray(run.split) <= np.asarray(spec_plan.split))
    L = s.live.num_layers
    assert np.all(np.asarray(strategies.baseline_plan(s.live, "end-only").split) == L)
    assert np.all(np.asarray(strategies.baseline_plan(s.live, "cloud-only").split) == 0)
    split = np.asarray(strategies.baseline_plan(s.live, "best-split").split)
    assert np.all((split > 0) & (split < L)) and len(set(split.tolist())) == 1
    with pytest.raises(ValueError, match="unknown baseline"):
        strategies.baseline_plan(s.live, "nope")


def test_an_overloaded_device_does_not_drag_the_others():
    from ec2moe_jax.config import load_config
    from ec2moe_jax.models.costs import model_costs
    from ec2moe_jax.profiles import LinkProfile, device
    from ec2moe_jax.scheduler import build_instance, codec_options, schedule, zipf_frequencies
    from ec2moe_jax.scheduler.model import UNSTABLE

    costs = model_costs(load_config("base").model)
    freq = zipf_frequencies(11, 32, 1.0)
    end = device("laptop-cpu").with_memory(4 * 2**30)

    def inst(links):
        return build_instance(costs, freq, [end] * len(links), device("t4"), links,
                              [20.0] * len(links), prompt_tokens=128,
                              codecs=codec_options(costs.d_model, SWEEP))

    good = LinkProfile("good", 50e6, 0.03)
    alone, _ = schedule(inst([good]))
    # Device 0's link is so slow that every plan overloads it; device 1 must still get the
    # plan it gets alone (the old max-utilisation objective gave it device 0's plan).
    both, info = schedule(inst([LinkProfile("bad", 1e3, 0.03), good]))
    assert float(info["objective"]) >= UNSTABLE  # unstable overall
    for f in ("split", "codec", "batch"):
        assert int(np.asarray(getattr(both, f))[1]) == int(np.asarray(getattr(alone, f))[0]), f


def test_report_tables_from_a_synthetic_record():
    from ec2moe_jax.bench import report, strategies

    def st(thr, lat, q=2.0):
        return {"allowed": True, "throughput_rps": thr, "latency_mean_s": lat,
                "latency_p95_s": 2 * lat, "plan_kinds": {"split": 1.0}, "bits_per_char": q}

    rows = []
    for w, ratio in (("score-128", 1.0), ("private-score-512", 3.0)):
        strat = {m: st(10.0, 1.0) for m in strategies.STRATEGIES}
        strat["ec2moe"] = st(10.0 * ratio, 1.0 / ratio, 2.1)
        if w.startswith("private"):
            strat["cloud-only"] = {"allowed": False}
        rows.append({"label": w, "regime": {"workload": w}, "bound_rps": 40.0,
                     "strategies": strat})
    for r in rows:
        r["comparison"] = __import__("ec2moe_jax.bench.evaluation",
                                     fromlist=["compare"]).compare(r)
    h = report.headline(rows)
    assert h["vs"]["best baseline"]["throughput_ratio"]["max"] == pytest.approx(3.0)
    assert h["per_workload"]["private-score-512"]["paper_throughput"] == 1
    assert h["per_workload"]["score-128"]["cloud_only_best_or_tied"] == 1
    assert h["per_workload"]["private-score-512"]["latency_reduction"]["median"] == \
        pytest.approx(1 - 1 / 3)
    md = report.markdown({"headline": h, "method_short": "test", "quality": {}})
    assert "| best baseline | 2.00x [1.00x, 3.00x]" in md
    assert "+67%" in md
    table = report.regime_table({"regimes": rows})
    assert table.count("\n") == 2 + len(rows)


def test_report_writes_json_with_infinite_ratios(tmp_path):
    import json
    import math

    from ec2moe_jax.bench import report

    rec = {"headline": {"vs": {"end-only": {"throughput_ratio": report._stats([2.0, math.inf]),
                                            "latency_reduction": report._stats([0.5]),
                                            "regimes": 2}},
                        "per_workload": {}, "ablations": {}, "quality": {}, "regimes": 2},
           "method_short": "test", "quality": {}, "regimes": [], "ratio": math.inf}
    md = report.markdown(rec)
    assert "| end-only | inf [2.00x, inf]" in md
    out = report.write(rec, str(tmp_path / "b.json"), str(tmp_path / "b.md"),
                       str(tmp_path / "b.png"))
    assert json.load(open(tmp_path / "b.json"))["ratio"] == "inf" == out["ratio"]
    assert (tmp_path / "b.md").read_text().startswith("# Evaluation tables")


def test_serving_runs_are_simulated_with_the_round_trip_their_clients_measured():
    # bench-serving's configuration of the simulator for one measured run: a split run
    # takes the clients' measured round trip per step, a cloud-only run the preset's delay
    # plus the relay's lateness. One client, 4 tokens, hand-computed timelines.
    from ec2moe_jax.bench.serving import simulate
    from ec2moe_jax.profiles import LinkProfile

    row = {"clients": 1, "server_batch_occupancy": 1.0, "server_cycle_s_median": 0.002,
           "server_step_wall_s_median": 0.002, "server_step_s_median": 0.002,
           "bytes_per_token": {"up": 125.0, "down": 125.0}, "client_end_prefill_s": 0.003,
           "client_step_s": 0.001, "server_prefill_s_median": 0.004,
           "relay_late_s_mean": 0.0005, "client_rtt_s_mean": 0.03}
    link = LinkProfile("test", bandwidth_bps=1e6, rtt_s=0.01)
    wire = 125 * 8 / 1e6  # one message's transfer, each way

    def split(rtt):  # prefill (end, up, cloud, down), then 3 steps (end, up, cloud, down)
        return (0.003 + 0.004 + 2 * (rtt / 2 + wire)) + 3 * (0.001 + 0.002 + 2 * (rtt / 2 + wire))

    assert simulate(row, "split", link, 4) == pytest.approx(split(0.03), abs=1e-9)
    assert simulate({**row, "client_rtt_s_mean": None}, "split", link, 4) == pytest.approx(
        split(0.01 + 2 * 0.0005), abs=1e-9)
