"""Weight-only int8/int4 experts on the end: hand-computed values and packing, the error
bound, the MSE scale search, exact byte counts, and the quantised end stage equal to a
float model holding the dequantised experts."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import assert_close

from ec2moe_jax.layers import QuantSpec, quantize, quantize_experts, quantize_mixed
from ec2moe_jax.layers.moe import QUANTIZED
from ec2moe_jax.layers.quant import relative_error
from ec2moe_jax.models.costs import model_costs
from ec2moe_jax.pipeline import build_stages, fixed_times, score
from ec2moe_jax.pipeline.link import Channel
from ec2moe_jax.profiles import LinkProfile, device
from ec2moe_jax.selection import select_for_profile


def test_hand_computed_values_and_nibble_packing():
    # One expert, I = 2 inputs, O = 1 output; absmax 1.0 so the int8 step is 1/127 and the
    # int4 step 1/7 (both exact in bf16? 1/7 is not: the stored bf16 scale is what counts).
    w = jnp.array([[[0.25], [-1.0]]])
    q8 = quantize(w, QuantSpec(8), search=False)
    assert q8.q.dtype == jnp.int8 and q8.q.tolist() == [[[32], [-127]]]  # round(0.25 * 127)
    q4 = quantize(w, QuantSpec(4), search=False)
    s = float(q4.scale[0, 0, 0])
    assert abs(s - 1 / 7) < 1e-3  # bf16 rounding of 1/7
    lo, hi = int(round(0.25 / s)), max(-8, int(round(-1.0 / s)))
    assert (lo, hi) == (2, -7)
    # Two values in one byte: even input row in the low nibble, odd in the high, offset 8.
    assert q4.q.dtype == jnp.uint8 and q4.q.shape == (1, 1, 1)
    assert int(q4.q[0, 0, 0]) == (lo + 8) | ((hi + 8) << 4)
    assert q4.values().tolist() == [[[2], [-7]]]
    assert q4.shape == (1, 2, 1)


@pytest.mark.parametrize("name", ["int8", "int4", "int4-g32"])
def test_error_within_half_a_step_and_search_never_worse(name):
    spec = QuantSpec.parse(name)
    w = jax.random.normal(jax.random.key(0), (3, 64, 48)) * 0.02
    plain = quantize(w, spec, search=False)
    # Absmax scale: every value within half a step, plus the bf16 rounding of the scale,
    # which may clip the largest value by up to 2^-8 of it.
    step = np.repeat(np.asarray(plain.scale, np.float32), 64 // spec.groups(64), axis=1)
    absmax = np.abs(np.asarray(w)).max()
    err = np.abs(np.asarray(w) - np.asarray(plain.dequantize()))
    assert np.all(err <= step / 2 + absmax * 2**-8 + 1e-9)
    # The MSE search includes the absmax scale (ratio 1.0), so it can only do better, and it
    # does for 4 bits on Gaussian weights.
    searched = quantize(w, spec)
    assert relative_error(w, searched) <= relative_error(w, plain) + 1e-7
    # Rounding error s / sqrt(12) with s = 3.5 sigma / qmax (the max of a few hundred normal
    # values) bounds the relative error: int8 0.8%, int4 14%.
    qmax = 2 ** (spec.bits - 1) - 1
    assert relative_error(w, searched) < 3.5 / (qmax * np.sqrt(12))
    if spec.bits == 4:
        assert relative_error(w, searched) < relative_error(w, plain)


def test_stored_bytes_are_what_costs_and_selection_count(tiny_pipeline):
    cfg = tiny_pipeline["cfg"].model
    d, f = cfg.d_model, cfg.moe.expert_dim
    w_in = jnp.ones((1, d, f))
    w_out = jnp.ones((1, f, d))
    for name in ("int8", "int4", "int4-g16"):
        spec = QuantSpec.parse(name)
        stored = 2 * quantize(w_in, spec).nbytes + quantize(w_out, spec).nbytes
        assert model_costs(cfg, experts=spec).expert_bytes == stored, name
    assert model_costs(cfg, experts=QuantSpec()).expert_bytes == 3 * d * f * 2  # bf16
    # The same memory holds about twice the int8 experts and four times the int4 ones.
    freq = np.full((cfg.num_layers, cfg.moe.num_experts), 1 / cfg.moe.num_experts)
    bf16 = model_costs(cfg, "bfloat16")
    memory = bf16.embed_bytes + bf16.fixed_bytes[:1].sum() + 3 * bf16.expert_bytes
    profile = dataclasses.replace(device("raspberry-pi-5-8gb").with_memory(memory))
    slots = {}
    for name in ("bf16", "int8", "int4"):
        costs = model_costs(cfg, "bfloat16", experts=QuantSpec.parse(name))
        slots[name] = select_for_profile(profile, freq, costs, num_end_layers=1).expert_slots
    assert slots["bf16"] == 3 and slots["int8"] == 5 and slots["int4"] == 8  # E = 8: all


def test_extreme_magnitudes_and_refusals_of_quantised_trees(tiny_pipeline):
    # The search compares errors relative to each group's range: tiny weights keep the
    # unclipped scale on ties instead of halving every value.
    w = jnp.full((1, 4, 2), 1e-20).at[0, 0, 0].set(-1e-20)
    q = quantize(w, QuantSpec(8))
    np.testing.assert_allclose(np.asarray(q.dequantize()), np.asarray(w), rtol=1e-2)
    params = tiny_pipeline["params"]
    from ec2moe_jax.layers.moe import unstack_experts
    from ec2moe_jax.models import cast_params

    with pytest.raises(ValueError, match="per-expert buffers"):
        quantize_experts(unstack_experts(params), QuantSpec(4), range(1))
    once = quantize_experts(params, QuantSpec(4), range(1))
    with pytest.raises(ValueError, match="quantised experts already"):
        quantize_experts(once, QuantSpec(8), range(1))
    # bf16 casting leaves the integer experts alone; the model still runs.
    cast = cast_params(once, "float32")
    assert cast["layer_0"]["moe"][QUANTIZED]["w_up"].q.dtype == jnp.uint8
    tiny_pipeline["model"].apply({"params": cast}, np.zeros((1, 3), np.int32))


def test_bad_specs_are_refused():
    with pytest.raises(ValueError, match="int3"):
        QuantSpec.parse("int3")
    with pytest.raises(ValueError, match="bits=5"):
        QuantSpec(5)
    with pytest.raises(ValueError, match="group_size=0 must be >= 1"):
        QuantSpec(4, 0)
    # Values pack along the whole input axis, so a group of any size works for every width.
    assert QuantSpec.parse("int8-g3").groups(6) == 2
    assert QuantSpec.parse("int4-g3").groups(6) == 2
    with pytest.raises(ValueError, match="group_size=48 does not divide"):
        QuantSpec(4, 48).groups(64)
    with pytest.raises(ValueError, match="nothing to quantise"):
        quantize(jnp.ones((1, 2, 2)), QuantSpec())


def _dequantized_reference(params, spec, layers):
    """Float parameters whose experts in ``layers`` are the dequantised copies."""
    out = jax.tree.map(lambda x: x, params)
    q = quantize_experts(params, spec, layers)
    for i in layers:
        block = q[f"layer_{i}"]["moe"][QUANTIZED]
        out[f"layer_{i}"]["moe"] = {**params[f"layer_{i}"]["moe"],
                                    **{k: v.dequantize() for k, v in block.items()}}
    return out


@pytest.mark.parametrize("name", ["int8", "int4-g16"])
def test_quantized_end_stage_equals_dequantize_then_float(tiny_pipeline, name):
    spec = QuantSpec.parse(name)
    model, params = tiny_pipeline["model"], tiny_pipeline["params"]
    # Random-init experts barely move the logits; scaled up, their quantisation error shows.
    moe = params["layer_0"]["moe"]
    params = {**params, "layer_0": {**params["layer_0"], "moe": {
        **moe, **{k: moe[k] * 8.0 for k in ("w_gate", "w_up", "w_down")}}}}
    v = tiny_pipeline["cfg"].model.vocab_size
    tokens = np.asarray(jax.random.randint(jax.random.key(1), (2, 9), 0, v))
    ref = _dequantized_reference(params, spec, range(1))
    ref_logits = model.apply({"params": ref}, tokens[:, :-1])
    # Whole-model check (gather/einsum dispatch over many tokens, and a decode-sized input
    # on the gathered path): quantised parameters run exactly as the dequantised floats.
    quantized = quantize_experts(params, spec, range(1))
    assert_close(model.apply({"params": quantized}, tokens[:, :-1]), ref_logits)
    assert_close(model.apply({"params": quantized}, tokens[:1, :1]),
                 model.apply({"params": ref}, tokens[:1, :1]))
    # The split pipeline with a quantised end (layer 0) and a float cloud.
    stages = build_stages(model, params, tiny_pipeline["end"], tiny_pipeline["cloud"], split=1,
                          end_experts=spec)
    assert QUANTIZED in stages.end_params["layer_0"]["moe"]
    channel = Channel.from_profile(LinkProfile("test", bandwidth_bps=1e6, rtt_s=0.1))
    _, rep = score(stages, tokens, channel=channel, keep_logits=True,
                   timer=fixed_times({"end": 0.01, "cloud": 0.01}))
    assert_close(rep.logits, ref_logits)
    # And it differs from the float model (the test would notice a no-op quantiser).
    full = model.apply({"params": params}, tokens[:, :-1])
    assert np.abs(np.asarray(full) - np.asarray(ref_logits)).max() > 1e-3


def test_int2_packing_and_mixed_precision_stacks():
    # int2: four values per byte, offset 2; the hand case: one output, four inputs.
    w = jnp.array([[[1.0], [-1.0], [0.4], [-2.0]]])  # absmax 2: step 2 (qmax 1)
    q = quantize(w, QuantSpec(2), search=False)
    assert q.q.shape == (1, 1, 1) and q.values().tolist() == [[[0], [0], [0], [-1]]]
    assert int(q.q[0, 0, 0]) == (0 + 2) | ((0 + 2) << 2) | ((0 + 2) << 4) | ((-1 + 2) << 6)
    with pytest.raises(ValueError, match="multiple of 4"):
        quantize(jnp.ones((1, 6, 2)), QuantSpec(2))
    # A mixed stack: expert 0 in int4, 1 in int2, 2 not stored (zero), 3 kept in bf16.
    x = jax.random.normal(jax.random.key(1), (4, 32, 8)) * 0.02
    mixed = quantize_mixed(x, [4, 2, 0, 16])
    d = np.asarray(mixed.dequantize())
    np.testing.assert_array_equal(d[0], np.asarray(quantize(x[:1], QuantSpec(4)).dequantize())[0])
    np.testing.assert_array_equal(d[1], np.asarray(quantize(x[1:2], QuantSpec(2)).dequantize())[0])
    assert not d[2].any()
    np.testing.assert_allclose(d[3], np.asarray(x[3]), rtol=1e-2, atol=1e-4)
    spec4, spec2 = QuantSpec(4), QuantSpec(2)
    assert mixed.nbytes == (spec4.bytes_per_matrix(32, 8) + spec2.bytes_per_matrix(32, 8)
                            + 2 * 32 * 8)
    with pytest.raises(ValueError, match="must hold 4 values"):
        quantize_mixed(x, [4, 3, 0, 16])
    with pytest.raises(ValueError, match="no expert"):
        quantize_mixed(x, [0, 0, 0, 0])


def test_mixed_precision_end_runs_as_its_dequantised_floats(tiny_pipeline):
    from ec2moe_jax.layers import quantize_experts_mixed

    model, params = tiny_pipeline["model"], tiny_pipeline["params"]
    bits = np.array([4, 4, 2, 2, 8, 16, 0, 0])
    mixed = quantize_experts_mixed(params, {0: bits})
    ref = jax.tree.map(lambda a: a, params)
    block = mixed["layer_0"]["moe"][QUANTIZED]
    ref["layer_0"]["moe"] = {**params["layer_0"]["moe"],
                             **{k: v.dequantize() for k, v in block.items()}}
    allowed = np.ones((2, 8), bool)
    allowed[0] = bits > 0
    tokens = np.asarray(jax.random.randint(jax.random.key(2), (2, 9), 0, 256))
    assert_close(model.apply({"params": mixed}, tokens, allowed=allowed),
                 model.apply({"params": ref}, tokens, allowed=allowed))
