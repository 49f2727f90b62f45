"""Hugging Face import, round 2: what transformers loads, we load (plain rope_type, a
redundant tied head, per-family defaults); quantized checkpoints (block-FP8 dequantized at
load, other methods refused by name); malformed files named with their field."""

import json
import os
import shutil

import ml_dtypes
import numpy as np
import pytest

from ec2moe_jax.models import load_hf, reference_parity
from ec2moe_jax.models.hf_config import (
    DEFAULT_THETA,
    FAMILY_DEFAULTS,
    UnsupportedCheckpoint,
    model_config_from_hf,
)
from ec2moe_jax.models.safetensors_io import read_file, write_file

FIX = os.path.join(os.path.dirname(__file__), "fixtures", "hf")
PARITY = 1e-4


def _copy(family, tmp_path, **changes):
    dst = tmp_path / family
    shutil.copytree(os.path.join(FIX, family), dst)
    if changes:
        cfg = json.load(open(dst / "config.json"))
        cfg.update(changes)
        json.dump(cfg, open(dst / "config.json", "w"))
    return dst


def test_rope_type_default_is_plain_rope(tmp_path):
    # Qwen2.5 / Qwen3-2507 configs carry rope_scaling {"rope_type": "default"}: plain RoPE.
    theta = json.load(open(os.path.join(FIX, "qwen3_moe", "config.json")))[
        "rope_parameters"]["rope_theta"]
    dst = _copy("qwen3_moe", tmp_path, rope_scaling={"rope_type": "default"}, rope_theta=theta)
    record = reference_parity(str(dst))[0]
    assert record["max_abs_logit_diff"] <= PARITY


def test_redundant_lm_head_of_a_tied_checkpoint_is_ignored(tmp_path):
    # A tied checkpoint that also stores lm_head.weight (= the embedding) loads like one
    # without it; a head that differs from the embedding is refused.
    dst = _copy("mixtral", tmp_path, tie_word_embeddings=True)
    t = read_file(str(dst / "model.safetensors"))
    t["lm_head.weight"] = t["model.embed_tokens.weight"].copy()
    write_file(str(dst / "model.safetensors"), t)
    model, params = load_hf(str(dst))
    assert "lm_head" not in params and model.cfg.tie_embeddings
    untied = _copy("mixtral", tmp_path / "u")
    u = dict(t)
    write_file(str(untied / "model.safetensors"), u)
    ref_model, ref_params = load_hf(str(untied))
    ids = np.arange(10, dtype=np.int32)[None] % model.cfg.vocab_size
    np.testing.assert_allclose(model.apply({"params": params}, ids),
                               ref_model.apply({"params": ref_params}, ids), atol=1e-5)
    t["lm_head.weight"] = t["lm_head.weight"] + 1.0
    write_file(str(dst / "model.safetensors"), t)
    with pytest.raises(UnsupportedCheckpoint, match="lm_head.weight differs"):
        load_hf(str(dst))


def _minimal(family, **extra):
    """The smallest config.json a family accepts: everything else takes the defaults."""
    return {"model_type": family, **extra}


def test_absent_keys_take_transformers_family_defaults():
    # A legacy Mixtral config without rope_theta: transformers' MixtralConfig uses 1e6.
    legacy = _minimal("mixtral", hidden_size=64, num_attention_heads=8, num_hidden_layers=2,
                      intermediate_size=32, vocab_size=100)
    cfg = model_config_from_hf(legacy)
    assert cfg.rope_theta == 1e6 and cfg.norm_eps == 1e-5 and cfg.max_seq_len == 131072
    assert cfg.num_kv_heads == 8 and cfg.moe.num_experts == 8 and cfg.moe.top_k == 2
    assert cfg.sliding_window is None
    olmoe = model_config_from_hf(_minimal("olmoe", hidden_size=64, num_attention_heads=4,
                                          num_hidden_layers=2, vocab_size=100))
    assert olmoe.rope_theta == 1e4 and olmoe.kv_heads == 4 and not olmoe.moe.renormalize
    assert olmoe.moe.num_experts == 64 and olmoe.moe.top_k == 8 and olmoe.norm_eps == 1e-5
    qwen3 = model_config_from_hf(_minimal("qwen3_moe", hidden_size=64, num_attention_heads=8,
                                          num_hidden_layers=2, vocab_size=100))
    assert qwen3.kv_heads == 4 and qwen3.moe.expert_dim == 768 and qwen3.norm_eps == 1e-6
    # Qwen3-MoE carries sliding_window=4096 but slides only with use_sliding_window.
    assert qwen3.sliding_window is None
    slid = model_config_from_hf(_minimal("qwen3_moe", hidden_size=64, num_attention_heads=8,
                                         num_hidden_layers=2, use_sliding_window=True))
    assert slid.sliding_window == 4096 and slid.sliding_layers is None


def test_qwen2_moe_sliding_layers_follow_max_window_layers():
    # transformers' Qwen2MoeConfig: layer i slides when (i + 1) % 2 and i < max_window_layers.
    c = _minimal("qwen2_moe", hidden_size=64, num_attention_heads=16, num_hidden_layers=6,
                 use_sliding_window=True, sliding_window=16, max_window_layers=3)
    cfg = model_config_from_hf(c)
    assert cfg.sliding_window == 16 and cfg.sliding_layers == (0, 2)
    assert [cfg.window(i) for i in range(6)] == [16, None, 16, None, None, None]
    explicit = model_config_from_hf({**c, "layer_types": ["full_attention"] * 6})
    assert explicit.sliding_window is None


@pytest.mark.parametrize("changes,match", [
    ({"num_hidden_layers": "2"}, "field 'num_hidden_layers' must be int, got '2'"),
    ({"rms_norm_eps": None}, "field 'rms_norm_eps' must be float"),
    ({"rope_parameters": {"rope_theta": -1.0}}, "field 'rope_theta' must be a positive"),
    ({"layer_types": ["full_attention"], "use_sliding_window": True, "sliding_window": 4},
     "field 'layer_types' must list 2"),
])
def test_wrong_field_types_name_the_file_and_field(tmp_path, changes, match):
    dst = _copy("qwen2_moe", tmp_path, **changes)
    with pytest.raises(ValueError, match=match) as e:
        load_hf(str(dst))
    assert "config.json" in str(e.value)


def test_truncated_config_and_index_name_the_file(tmp_path):
    dst = _copy("olmoe", tmp_path)
    text = (dst / "config.json").read_text()
    (dst / "config.json").write_text(text[: len(text) // 2])
    with pytest.raises(ValueError, match=r"config.json' is not valid JSON \(line"):
        load_hf(str(dst))
    dst = _copy("qwen3_moe", tmp_path / "idx")
    os.replace(dst / "model.safetensors", dst / "model-00001-of-00001.safetensors")
    index = dst / "model.safetensors.index.json"
    index.write_text('{"weight_map": {"a": "model-00001-of')
    with pytest.raises(ValueError, match="model.safetensors.index.json' is not valid JSON"):
        load_hf(str(dst))
    index.write_text('{"metadata": {}}')
    with pytest.raises(ValueError, match="index.json' has no field 'weight_map'"):
        load_hf(str(dst))
    index.write_text('{"weight_map": {"a": 3}}')
    with pytest.raises(ValueError, match="field 'weight_map' maps 'a' to 3"):
        load_hf(str(dst))


@pytest.mark.parametrize("qc,match", [
    ({"quant_method": "gptq", "bits": 4}, "quant_method='gptq' is not supported"),
    ({"quant_method": "awq"}, "quant_method='awq'"),
    ({"quant_method": "fp8", "activation_scheme": "static"}, "activation_scheme='static'"),
    ({"quant_method": "fp8", "weight_block_size": [128]}, "weight_block_size"),
])
def test_other_quantization_methods_are_refused_by_name(tmp_path, qc, match):
    with pytest.raises(ValueError, match=match):
        load_hf(str(_copy("qwen3_moe", tmp_path, quantization_config=qc)))


def _quantize_block_fp8(w, block):
    """Reference quantizer (DeepSeek-V3 style): per [bo, bi] block, scale = amax / 448."""
    bo, bi = block
    o, i = w.shape
    go, gi = -(-o // bo), -(-i // bi)
    scale = np.zeros((go, gi), np.float32)
    q = np.zeros_like(w, dtype=ml_dtypes.float8_e4m3fn)
    deq = np.zeros_like(w)
    for a in range(go):
        for b in range(gi):
            blk = w[a * bo:(a + 1) * bo, b * bi:(b + 1) * bi]
            s = max(float(np.abs(blk).max()), 1e-12) / 448.0
            qb = (blk / s).astype(ml_dtypes.float8_e4m3fn)
            q[a * bo:(a + 1) * bo, b * bi:(b + 1) * bi] = qb
            deq[a * bo:(a + 1) * bo, b * bi:(b + 1) * bi] = qb.astype(np.float32) * s
            scale[a, b] = s
    return q, scale, deq


def test_block_fp8_checkpoint_is_dequantized_at_load(tmp_path):
    # Quantize the Qwen3-MoE fixture's projection weights to FP8 in blocks of [8, 16] (sizes
    # that do not divide every matrix: ragged edge blocks), store scale_inv next to them,
    # and compare with the checkpoint holding the same dequantized values in float32.
    block = (8, 16)
    q_dir = _copy("qwen3_moe", tmp_path / "q", quantization_config={
        "quant_method": "fp8", "fmt": "e4m3", "activation_scheme": "dynamic",
        "weight_block_size": list(block)})
    ref_dir = _copy("qwen3_moe", tmp_path / "ref")
    t = read_file(str(q_dir / "model.safetensors"))
    quant, deq = {}, {}
    for k, w in t.items():
        if k.endswith("proj.weight") and w.ndim == 2:
            q, s, d = _quantize_block_fp8(np.asarray(w, np.float32), block)
            quant[k], quant[k + "_scale_inv"], deq[k] = q, s, d
        else:
            quant[k] = deq[k] = w
    write_file(str(q_dir / "model.safetensors"), quant)
    write_file(str(ref_dir / "model.safetensors"), deq)
    assert read_file(str(q_dir / "model.safetensors"))[
        "model.layers.0.self_attn.q_proj.weight"].dtype == ml_dtypes.float8_e4m3fn
    model, params = load_hf(str(q_dir))
    _, ref = load_hf(str(ref_dir))
    for a, b in zip(np.asarray(params["layer_1"]["moe"]["w_gate"]).ravel(),
                    np.asarray(ref["layer_1"]["moe"]["w_gate"]).ravel(), strict=True):
        assert a == b
    ids = np.load(os.path.join(FIX, "qwen3_moe", "reference.npz"))["token_ids"]
    np.testing.assert_allclose(model.apply({"params": params}, ids),
                               model.apply({"params": ref}, ids), atol=1e-5)
    del quant["model.layers.0.self_attn.q_proj.weight_scale_inv"]
    write_file(str(q_dir / "model.safetensors"), quant)
    with pytest.raises(UnsupportedCheckpoint, match="q_proj.weight' has no weight_scale_inv"):
        load_hf(str(q_dir))


@pytest.mark.torch
@pytest.mark.parametrize("family", sorted(FAMILY_DEFAULTS))
def test_family_defaults_equal_the_installed_transformers(family):
    """The default table against transformers' config dataclasses (needs transformers)."""
    import dataclasses

    import transformers

    cls = transformers.AutoConfig.for_model(family).__class__
    fields = {f.name: f.default for f in dataclasses.fields(cls)}
    for key, ours in FAMILY_DEFAULTS[family].items():
        if key in ("mlp_bias", "head_dim") and key not in fields:
            continue  # not a field of this family: transformers never reads it
        assert key in fields, f"{family}: {key} is not a field of {cls.__name__}"
        assert fields[key] == ours, f"{family}.{key}: ours {ours!r}, transformers {fields[key]!r}"
    assert cls.default_theta == DEFAULT_THETA.get(family, 1e4)


_FP4 = np.array([0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0,
                 -0.0, -0.5, -1.0, -1.5, -2.0, -3.0, -4.0, -6.0], np.float32)


def _quantize_mxfp4(w):
    """Reference MXFP4 quantizer of ``w`` [..., R, C] (C a multiple of 32): per 32 values a
    power-of-two scale with amax / scale <= 6, each value rounded to the nearest FP4 value;
    returns (blocks <uint8>[..., R, C/32, 16], scales <uint8>[..., R, C/32], dequantized)."""
    g = w.reshape(*w.shape[:-1], -1, 32)
    amax = np.maximum(np.abs(g).max(-1), 1e-30)
    exp = np.ceil(np.log2(amax / 6.0)).astype(np.int32)
    scaled = g / np.ldexp(1.0, exp)[..., None]
    nib = np.abs(scaled[..., None] - _FP4).argmin(-1).astype(np.uint8)  # [..., G, 32]
    deq = np.ldexp(_FP4[nib], exp[..., None]).reshape(w.shape)
    blocks = (nib[..., 0::2] | (nib[..., 1::2] << 4)).astype(np.uint8)
    return blocks, (exp + 127).astype(np.uint8), deq


def test_mxfp4_experts_are_dequantized_at_load(tmp_path):
    # GPT-OSS publishes its experts as MXFP4 blocks: quantize the fixture's (stored
    # [E, R, C] = transposed in-memory layout) and compare with the same values in float32.
    q_dir = _copy("gpt_oss", tmp_path / "q", quantization_config={"quant_method": "mxfp4"})
    ref_dir = _copy("gpt_oss", tmp_path / "ref")
    t = read_file(str(q_dir / "model.safetensors"))
    quant, deq = dict(t), dict(t)
    for k in [k for k in t if k.endswith(("experts.gate_up_proj", "experts.down_proj"))]:
        stored = np.swapaxes(np.asarray(t[k], np.float32), -1, -2)  # [E, out, in]
        blocks, scales, d = _quantize_mxfp4(stored)
        del quant[k]
        quant[k + "_blocks"], quant[k + "_scales"] = blocks, scales
        deq[k] = np.swapaxes(d, -1, -2)
    write_file(str(q_dir / "model.safetensors"), quant)
    write_file(str(ref_dir / "model.safetensors"), deq)
    _, params = load_hf(str(q_dir))
    _, ref = load_hf(str(ref_dir))
    for name in ("w_gate", "w_up", "w_down"):
        np.testing.assert_array_equal(params["layer_0"]["moe"][name],
                                      ref["layer_0"]["moe"][name])
    assert not np.array_equal(ref["layer_0"]["moe"]["w_up"],
                              load_hf(os.path.join(FIX, "gpt_oss"))[1]["layer_0"]["moe"]["w_up"])
    del quant["model.layers.1.mlp.experts.down_proj_scales"]
    write_file(str(q_dir / "model.safetensors"), quant)
    with pytest.raises(UnsupportedCheckpoint, match="down_proj_blocks' has no"):
        load_hf(str(q_dir))
