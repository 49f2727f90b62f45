"""The stage engine: an end job then a cloud job equal the unsplit model at every split, the
bytes it counts are the length of the real wire payload, KV caches are explicit state that
prefixes can be inserted into, and a second call of the same shapes compiles nothing. Tiny
config (2 layers, D = 32), random parameters."""

import jax
import numpy as np
import pytest
from conftest import assert_close

from ec2moe_jax.codec import CodecSpec, wire
from ec2moe_jax.models.generate import generate_recompute
from ec2moe_jax.pipeline import (
    CloudEngine,
    EndEngine,
    Message,
    Sample,
    Scores,
    build_stages,
    insert,
)
from ec2moe_jax.pipeline.stages import place_params


@pytest.fixture(scope="module")
def world(tiny_pipeline):
    v = tiny_pipeline["cfg"].model.vocab_size
    rows = np.asarray(jax.random.randint(jax.random.key(1), (2, 9), 0, v), np.int32)
    return {**tiny_pipeline, "rows": rows}


def _recorder():
    """A timer that runs each stage, charges 1 ms and records the stage names in order."""
    names = []

    def timer(name, fn, *args):
        names.append(name)
        return jax.block_until_ready(fn(*args)), 0.001

    return timer, names


def _score(end, cloud, rows):
    up, dt_end = end.score(rows)
    if isinstance(up, Scores):
        return up, up, dt_end, 0.0
    res, dt_cloud = cloud.score(up)
    return up, res, dt_end, dt_cloud


@pytest.mark.parametrize("split", [0, 1, 2])
def test_end_then_cloud_scoring_equals_the_unsplit_model(world, split):
    # Lossless float32 boundary, every expert resident: whatever the split, the two jobs
    # compute the unsplit model's logits. B = 2 requests of T = 8 scored tokens.
    rows, model = world["rows"], world["model"]
    logits = model.apply({"params": world["params"]}, rows[:, :-1])
    ref_lp = np.take_along_axis(np.asarray(jax.nn.log_softmax(logits, -1)),
                                rows[:, 1:, None], -1)[..., 0]
    timer, names = _recorder()
    stages = world["stages"][split]
    end, cloud = EndEngine(stages, timer), CloudEngine(stages, timer)
    up, res, dt_end, dt_cloud = _score(end, cloud, rows)
    assert_close(res.logits, logits)
    assert_close(res.logprobs, ref_lp)
    if split == 0:
        # Cloud-only: the end computes nothing; its message is the T input ids (one 24-byte
        # header + 4 bytes each), the targets travel along; the reply is 2 x 8 float32 scores.
        np.testing.assert_array_equal(up.payload, rows[:, :-1])
        assert (up.nbytes, dt_end, dt_cloud) == (24 + 2 * 8 * 4, 0.0, 0.002)
        assert names == ["hop", "cloud"] and res.nbytes == 24 + 2 * 8 * 4
    elif split == 1:
        # The float32 hidden state [2, 8, 32] and the 2 x 8 target ids in one message.
        assert isinstance(up, Message) and up.payload["h"].shape == (2, 8, 32)
        assert up.nbytes == 24 + 2 * 8 * 32 * 4 + 2 * 8 * 4
        assert names == ["end", "hop", "cloud"] and (dt_end, dt_cloud) == (0.001, 0.002)
    else:  # end-only: nothing crosses
        assert res.nbytes == 0 and names == ["end"] and dt_end == 0.001


@pytest.mark.parametrize("split", [0, 1, 2])
def test_end_then_cloud_decoding_equals_recomputation(world, split):
    # Greedy decoding of 4 tokens after a 5-token prompt with the engines' KV caches on both
    # sides equals full recomputation by the unsplit model.
    prompts = world["rows"][:, :5]
    ref = np.asarray(generate_recompute(world["model"], world["params"], prompts, 4))
    stages = world["stages"][split]
    end, cloud = EndEngine(stages), CloudEngine(stages)
    ec, cc, key = end.init_cache(2), cloud.init_cache(2), jax.random.key(0)
    out, token = [], None
    for k in range(4):
        if split == 0 and k > 0:  # the cloud feeds back its own token
            cc, res, _ = cloud.generate(cc, token, key)
        else:
            ec, up, _ = (end.prefill(ec, prompts, key) if k == 0
                         else end.step(ec, token, key))
            if isinstance(up, Sample):  # end-only
                res = up
            else:
                fn = cloud.prefill if k == 0 else cloud.step
                cc, res, _ = fn(cc, up, key)
                t = 5 if k == 0 else 1  # ids (split 0) or float32 [2, t, 32] (split 1)
                assert up.nbytes == 24 + 2 * t * (4 if split == 0 else 32 * 4)
        token = res.token
        out.append(np.asarray(token))
        assert res.nbytes == (0 if split == 2 else 24 + 2 * 4)
    np.testing.assert_array_equal(np.stack(out, 1), ref)


def test_counted_bytes_are_the_wire_payload_length(world):
    # An int8 rank-8 codec at split 1: the message's counted bytes equal the length of the
    # payload the wire format builds from its very arrays (24-byte header + 4-byte scale and
    # 8 int8 levels per token); scoring adds 4 bytes per target id.
    model, d = world["model"], world["model"].cfg.d_model
    codec = {"mean": np.zeros(d, np.float32), "w_enc": np.eye(d, 8, dtype=np.float32),
             "w_dec": np.eye(8, d, dtype=np.float32)}
    st = build_stages(model, world["params"], world["end"], world["cloud"], split=1,
                      transport=CodecSpec("int8", 8), codec=codec)
    end = EndEngine(st)
    _, msg, _ = end.prefill(end.init_cache(2), world["rows"][:, :5], jax.random.key(0))
    q, scale = np.asarray(msg.payload["q"]), np.asarray(msg.payload["scale"])
    assert q.shape == (2, 5, 8) and q.dtype == np.int8
    assert msg.nbytes == len(wire.pack(q, scale, "int8")) == 24 + 2 * 5 * (4 + 8)
    up, _ = end.score(world["rows"])
    q, scale = np.asarray(up.payload["q"]), np.asarray(up.payload["scale"])
    assert up.nbytes == len(wire.pack(q, scale, "int8")) + 2 * 8 * 4
    # The float32 boundary of the shared split-1 stages, likewise.
    up, _ = EndEngine(world["stages"][1]).score(world["rows"])
    h = np.asarray(up.payload["h"])
    assert up.nbytes == len(wire.pack(h, None, "float32")) + 2 * 8 * 4


def test_insert_joins_prefilled_requests_into_one_decode_state(world):
    # Two requests prefilled one by one (batch 1) and inserted into rows 0 and 1 of a
    # batch-2 decode state continue exactly as the two prefilled together.
    stages, prompts, key = world["stages"][1], world["rows"][:, :5], jax.random.key(0)
    end, cloud = EndEngine(stages), CloudEngine(stages)
    ec, up, _ = end.prefill(end.init_cache(2), prompts, key)
    cc, first, _ = cloud.prefill(cloud.init_cache(2), up, key)
    ec, up, _ = end.step(ec, first.token, key)
    _, second, _ = cloud.step(cc, up, key)

    es, cs, tokens = end.init_cache(2), cloud.init_cache(2), []
    for r in (0, 1):
        pe, up, _ = end.prefill(end.init_cache(1), prompts[r:r + 1], key)
        pc, res, _ = cloud.prefill(cloud.init_cache(1), up, key)
        es, cs = insert(pe, es, r), insert(pc, cs, r)
        tokens.append(np.asarray(res.token))
    np.testing.assert_array_equal(np.concatenate(tokens), first.token)
    es, up, _ = end.step(es, np.concatenate(tokens), key)
    _, again, _ = cloud.step(cs, up, key)
    np.testing.assert_array_equal(again.token, second.token)
    assert_close(again.logits, second.logits, rtol=1e-4, atol=1e-4)

    # Rows [2, 3) do not exist, a prefix longer than the state does not fit its rows.
    short, _, _ = end.prefill(end.init_cache(1), prompts[:1, :4], key)
    with pytest.raises(ValueError, match="positions per row"):
        insert(short, end.init_cache(2, 16), 0)
    with pytest.raises(ValueError, match="do not fit"):
        insert(short, end.init_cache(2), 2)
    with pytest.raises(ValueError, match="different layers"):
        insert(short, cloud.init_cache(2), 0)


def test_sequences_at_different_positions_share_one_decode_state(world):
    # Continuous batching at split 1: three prompts of 3, 5 and 7 tokens (right-padded to 8,
    # prefilled alone into 16-position caches) join a 4-slot, 32-position decode state one
    # per step; every step runs all 4 slots with an active-row mask (slot 3 never used, and
    # a row idles once it has its 4 tokens). Each row's greedy tokens equal its sequence
    # decoded alone by full recomputation, token for token, and the logits behind every
    # token equal the unsplit model's on that row's sequence alone (random weights barely
    # attend, so the tokens alone would not see a wrong position).
    stages, key, n = world["stages"][1], jax.random.key(0), 4
    model, params = world["model"], world["params"]
    end, cloud = EndEngine(stages), CloudEngine(stages)
    lens = [3, 5, 7]
    prompts = np.asarray(jax.random.randint(jax.random.key(7), (3, 8), 0, 256), np.int32)
    es, cs = end.init_cache(4, 32), cloud.init_cache(4, 32)
    out, logits = [[] for _ in range(3)], [[] for _ in range(3)]
    last = np.zeros(4, np.int32)
    for k in range(3 + n):
        if k < 3:
            pe, up, _ = end.prefill(end.init_cache(1, 16), prompts[k:k + 1], key, [lens[k]])
            assert up.nbytes == 24 + lens[k] * 32 * 4  # the padding is not sent
            pc, first, _ = cloud.prefill(cloud.init_cache(1, 16), up, key)
            es, cs = insert(pe, es, k), insert(pc, cs, k)
            last[k] = int(first.token[0])
            out[k].append(last[k])
            logits[k].append(np.asarray(first.logits[0]))
        active = np.array([r < 3 and 0 < len(out[r]) < n for r in range(4)])
        es, up, _ = end.step(es, last, key, active)
        cs, res, _ = cloud.step(cs, up, key)
        last = np.where(active, np.asarray(res.token), last)
        for r in np.flatnonzero(active):
            out[r].append(int(last[r]))
            logits[r].append(np.asarray(res.logits[r]))
    for r in range(3):
        alone = prompts[r:r + 1, :lens[r]]
        np.testing.assert_array_equal(out[r], generate_recompute(model, params, alone, n)[0],
                                      err_msg=f"row {r}")
        seq = np.concatenate([alone[0], out[r][:-1]])[None]
        full = np.asarray(model.apply({"params": params}, seq))[0, lens[r] - 1:]
        assert_close(np.stack(logits[r]), full, rtol=1e-4, atol=1e-4)


def test_one_sided_builds_share_placed_parameters_and_decode_alike(world):
    # A client builds only the end side, a server only the cloud side, from parameters it
    # placed once on its mesh and shares across splits (the same buffers at splits 0 and 1).
    # Decoding through the two one-sided builds equals recomputation, as the in-process
    # pipeline does; each build refuses the side it does not hold.
    model, params, key = world["model"], world["params"], jax.random.key(0)
    placed = place_params(model, params, world["cloud"])
    c1 = build_stages(model, placed, None, world["cloud"], split=1, side="cloud")
    c0 = build_stages(model, placed, None, world["cloud"], split=0, side="cloud")
    w1, w0 = c1.cloud_params["layer_1"], c0.cloud_params["layer_1"]
    assert all(a is b for a, b in zip(jax.tree.leaves(w1), jax.tree.leaves(w0), strict=True))
    assert "layer_0" not in c1.cloud_params and c1.end_params is None
    e1 = build_stages(model, params, world["end"], None, split=1, side="end")
    assert set(k for k in e1.end_params if k.startswith("layer_")) == {"layer_0"}
    with pytest.raises(ValueError, match="side='end'"):
        CloudEngine(e1)
    with pytest.raises(ValueError, match="side='cloud'"):
        EndEngine(c1)
    end, cloud = EndEngine(e1), CloudEngine(c1)
    prompts = world["rows"][:, :5]
    ec, up, _ = end.prefill(end.init_cache(2, 16), prompts, key)
    cc, res, _ = cloud.prefill(cloud.init_cache(2, 16), up, key)
    out = [np.asarray(res.token)]
    for _ in range(2):
        ec, up, _ = end.step(ec, res.token, key)
        cc, res, _ = cloud.step(cc, up, key)
        out.append(np.asarray(res.token))
    ref = generate_recompute(model, params, prompts, 3)
    np.testing.assert_array_equal(np.stack(out, 1), ref)


_COMPILES = []
jax.monitoring.register_event_duration_secs_listener(
    lambda event, duration, **kw: _COMPILES.append(event) if "backend_compile" in event
    else None)


def test_a_second_call_of_the_same_shapes_compiles_nothing(world):
    # Scoring and three decode steps through both engines at split 1, twice with new values,
    # at a batch of 3 no other test uses (so the first round must compile): the stage
    # functions were jitted once by build_stages; the second round compiles nothing.
    stages, v = world["stages"][1], world["model"].cfg.vocab_size
    end, cloud = EndEngine(stages), CloudEngine(stages)
    keys = list(jax.random.split(jax.random.key(3), 4))
    rows = np.asarray(jax.random.randint(jax.random.key(4), (2, 3, 9), 0, v), np.int32)

    def one_round(rows):
        _score(end, cloud, rows)
        ec, up, _ = end.prefill(end.init_cache(3), rows[:, :5], keys[0])
        cc, res, _ = cloud.prefill(cloud.init_cache(3), up, keys[0])
        for k in (1, 2, 3):
            ec, up, _ = end.step(ec, res.token, keys[k])
            cc, res, _ = cloud.step(cc, up, keys[k])
        return np.asarray(res.token)

    before = len(_COMPILES)
    one_round(rows[0])
    assert len(_COMPILES) > before, "the listener must see the first round compile"
    before = len(_COMPILES)
    one_round(rows[1])
    assert len(_COMPILES) == before, _COMPILES[before:]
