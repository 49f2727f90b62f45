"""End-cloud pipeline: split = unsplit, cached generation = recomputation, micro-batching is
invisible, the virtual clock is exact, and link failures are retried or fail loudly with no
request lost or run twice. Tiny config, random parameters (no trained model in CI)."""

import jax
import numpy as np
import pytest
from conftest import assert_close

from ec2moe_jax.codec import CodecSpec, compress
from ec2moe_jax.models.generate import generate_recompute
from ec2moe_jax.pipeline import (
    BandwidthTrace,
    Channel,
    Failures,
    LinkError,
    build_stages,
    fixed_times,
    generate,
    score,
)
from ec2moe_jax.profiles import LinkProfile

FAST = LinkProfile("test", bandwidth_bps=1e6, rtt_s=0.1)
TIMES = {"end": 0.01, "cloud": 0.02, "end_prefill": 0.01, "end_step": 0.001,
         "cloud_prefill": 0.02, "cloud_step": 0.002}


@pytest.fixture(scope="module")
def world(tiny_pipeline):
    v = tiny_pipeline["cfg"].model.vocab_size
    tokens = np.asarray(jax.random.randint(jax.random.key(1), (4, 13), 0, v))
    return {**tiny_pipeline, "tokens": tokens}


def _channel(**kw):
    return Channel.from_profile(FAST, **kw)


def _reference_logprob(world):
    tok = world["tokens"]
    logits = world["model"].apply({"params": world["params"]}, tok[:, :-1])
    lp = np.asarray(jax.nn.log_softmax(logits, -1))
    return np.asarray(logits), np.take_along_axis(lp, tok[:, 1:, None], -1)[..., 0]


@pytest.mark.parametrize("split", [0, 1, 2])
def test_split_scoring_equals_unsplit_model(world, split):
    # Lossless transport (float32 hidden state), every expert resident: the split pipeline
    # (end and cloud on disjoint submeshes, experts sharded on the cloud) is the same function.
    ref_logits, ref_lp = _reference_logprob(world)
    lp, rep = score(world["stages"][split], world["tokens"], channel=_channel(),
                    micro_batch=2, keep_logits=True, timer=fixed_times(TIMES))
    assert_close(rep.logits, ref_logits)
    assert_close(lp, ref_lp)
    assert sorted(r.id for r in rep.requests) == [0, 1, 2, 3]


def test_group_gate_runs_in_the_end_stage(world, tmp_path):
    # A plan that drops experts: layer 0 (the end) keeps 4 of 8 experts and routes with a
    # trained-shape HL-GGN gate; the pipeline equals the split forward of the gate library,
    # and the runtime reloads the gate saved for that mask instead of the router.
    from ec2moe_jax.pipeline.runtime import group_gates
    from ec2moe_jax.training import gate as gate_lib

    model, params = world["model"], world["params"]
    cfg = model.cfg
    allowed = np.ones((cfg.num_layers, cfg.moe.num_experts), bool)
    allowed[0, 4:] = False
    freq = np.full((cfg.num_layers, cfg.moe.num_experts), 1 / cfg.moe.num_experts)
    text = np.asarray(jax.random.randint(jax.random.key(5), (2048,), 0, 256), np.uint8)
    gates, source = group_gates(model, params, allowed, 1, freq, workdir=str(tmp_path),
                                train_tokens=text, steps=2)
    assert "trained here" in source
    spec, gp = gates
    st = build_stages(model, params, world["end"], world["cloud"], split=1, allowed=allowed,
                      gates=gates)
    _, rep = score(st, world["tokens"], channel=_channel(), micro_batch=2, keep_logits=True,
                   timer=fixed_times(TIMES))
    want, _, _ = gate_lib.split_forward(model, params, world["tokens"][:, :-1], spec, gp)
    assert_close(rep.logits, want, rtol=1e-4, atol=1e-4)
    again, source = group_gates(model, params, allowed, 1, freq, workdir=str(tmp_path),
                                train_tokens=text)
    assert "gates/mask-" in source
    jax.tree.map(np.testing.assert_array_equal, again[1], gp)


def test_full_rank_float_codec_is_lossless_and_bytes_match_the_wire(world):
    # An identity low-rank codec at R = D with float latents is the identity map.
    d = world["model"].cfg.d_model
    eye = {"mean": np.zeros(d, np.float32), "w_enc": np.eye(d, dtype=np.float32),
           "w_dec": np.eye(d, dtype=np.float32)}
    st = build_stages(world["model"], world["params"], world["end"], world["cloud"], split=1,
                      transport=CodecSpec("fp32", d), codec=eye)
    ref_logits, _ = _reference_logprob(world)
    _, rep = score(st, world["tokens"], channel=_channel(), micro_batch=2, keep_logits=True,
                   timer=fixed_times(TIMES))
    assert_close(rep.logits, ref_logits, rtol=1e-4, atol=1e-4)
    # The counted bytes are the real wire format's length (int8 latents of rank 8).
    r8 = {"mean": np.zeros(d, np.float32), "w_enc": np.eye(d, 8, dtype=np.float32),
          "w_dec": np.eye(8, d, dtype=np.float32)}
    h = np.ones((2, 5, d), np.float32)
    assert CodecSpec("int8", 8).payload_bytes(2, 5, d) == len(compress(r8, h, "int8"))


@pytest.mark.parametrize("split", [0, 1, 2])
def test_generation_with_split_kv_caches_equals_recomputation(world, split):
    prompts = world["tokens"][:, :5]
    ref = np.asarray(generate_recompute(world["model"], world["params"], prompts, 6))
    out, rep = generate(world["stages"][split], prompts, 6, channel=_channel(), micro_batch=2,
                        timer=fixed_times(TIMES))
    np.testing.assert_array_equal(out, ref)
    assert all(r.ttft_s > 0 and r.tpot_s > 0 for r in rep.requests)


def test_micro_batched_equals_single_batch(world):
    st = world["stages"][1]
    # One batch of 4 vs micro-batches of 2 (the shapes other tests compile already).
    one, _ = score(st, world["tokens"], channel=_channel(), micro_batch=4)
    lp, _ = score(st, world["tokens"], channel=_channel(), micro_batch=2)
    assert_close(lp, one)
    prompts = world["tokens"][:, :5]
    g4, _ = generate(st, prompts, 6, channel=_channel(), micro_batch=4)
    g2, _ = generate(st, prompts, 6, channel=_channel(), micro_batch=2)
    np.testing.assert_array_equal(g2, g4)


def test_virtual_clock_accounts_link_time_exactly(world):
    # Two micro-batches of one request, 12 tokens each, split 1, float32 hidden state (D=32).
    # Uplink message: 24-byte header + 12*32*4 latents + 12*4 target ids = 1608 bytes;
    # reply: 24 + 12*4 scores = 72 bytes; 1 Mbit/s, RTT 0.1 s; end 10 ms, cloud 20 ms.
    up, down = 8 * 1608 / 1e6, 8 * 72 / 1e6
    _, rep = score(world["stages"][1], world["tokens"][:2], channel=_channel(), micro_batch=1,
                   timer=fixed_times({"end": 0.01, "cloud": 0.02}))
    # Micro-batch 0: end 0-0.01, uplink 0.01-(0.01+up), arrives +0.05, cloud 20 ms, reply.
    cloud0 = 0.01 + up + 0.05 + 0.02
    t0 = cloud0 + down + 0.05
    # Micro-batch 1: end 0.01-0.02; uplink free at 0.01+up < 0.02; the cloud is busy until
    # cloud0 (later than its arrival 0.02+up+0.05), so its cloud stage starts at cloud0.
    assert 0.02 + up + 0.05 < cloud0
    t1 = cloud0 + 0.02 + down + 0.05
    assert [r.latency_s for r in rep.requests] == pytest.approx([t0, t1], abs=1e-12)
    assert rep.bytes_up == 2 * 1608 and rep.bytes_down == 2 * 72
    # A bandwidth trace: 1 Mbit/s until t=1 s, then 2 Mbit/s; 1 Mbit sent from t=0.5 takes
    # 0.5 s at 1 Mbit/s (0.5 Mbit) plus 0.25 s at 2 Mbit/s.
    trace = BandwidthTrace((0.0, 1.0), (1e6, 2e6))
    assert trace.finish(0.5, 125_000) == pytest.approx(1.25)


def _gen(world, channel, n=6):
    prompts = world["tokens"][:, :5]
    return generate(world["stages"][1], prompts, n, channel=channel, micro_batch=2,
                    timer=fixed_times(TIMES))


def test_lost_messages_are_retried_exactly_once(world):
    clean, rep0 = _gen(world, _channel())
    # Message 3 on the uplink is the first decode step of micro-batch 1 (0, 1 = prefills,
    # 2 = step of micro-batch 0); message 4 of the downlink is a reply: the cloud has already
    # advanced its KV cache, so the resent request must be answered from what it served.
    for kw in ({"up_failures": Failures(drop=frozenset({3}))},
               {"down_failures": Failures(drop=frozenset({4}))}):
        out, rep = _gen(world, _channel(**kw))
        np.testing.assert_array_equal(out, clean)
        assert set(rep.served.values()) == {1} and len(rep.served) == len(rep0.served)
        assert sorted(r.id for r in rep.requests) == [0, 1, 2, 3]
        assert max(r.attempts for r in rep.requests) == 2
        assert rep.makespan_s > rep0.makespan_s  # the retry cost a timeout
        hit = [r.id for r in rep.requests if r.attempts == 2]
        assert hit == ([2, 3] if "up_failures" in kw else [0, 1])


def test_link_outage_beyond_the_retry_budget_fails_clearly(world):
    ch = _channel(up_failures=Failures(down=((0.05, 10.0),)), max_attempts=3)
    with pytest.raises(LinkError, match=r"no reply after 3 attempts"):
        _gen(world, ch)
    # A short outage within the budget only delays the requests.
    out, _ = _gen(world, _channel(up_failures=Failures(down=((0.05, 0.3),)), max_attempts=3))
    np.testing.assert_array_equal(out, _gen(world, _channel())[0])


def test_transport_and_stage_validation(world):
    with pytest.raises(ValueError, match="rank"):
        CodecSpec("int8")
    with pytest.raises(ValueError, match="split=3"):
        build_stages(world["model"], world["params"], world["end"], world["cloud"], split=3)
    with pytest.raises(ValueError, match="codec weights"):
        build_stages(world["model"], world["params"], world["end"], world["cloud"], split=1,
                     transport=CodecSpec("int8", 8))
    with pytest.raises(ValueError, match="max_seq_len"):
        generate(world["stages"][1], world["tokens"][:, :5], 100, channel=_channel())
