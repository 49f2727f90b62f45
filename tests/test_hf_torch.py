"""Parity against transformers on fresh random checkpoints of all six families, built here
from their config classes (needs torch and transformers: ``python -m pytest -m torch``; CI
has neither and runs the committed fixtures instead): logits over sequences longer than
the sliding windows, greedy tokens over 16 steps, bf16-saved weights, a sharded index,
block-FP8 and MXFP4 checkpoints against transformers' own dequantization."""

import importlib.util
import json
import os

import numpy as np
import pytest

from ec2moe_jax.models import generate, load_hf

pytestmark = pytest.mark.torch

FIX = os.path.join(os.path.dirname(__file__), "fixtures", "hf")
FAMILIES = ["mixtral", "olmoe", "qwen2_moe", "qwen3_moe", "granitemoe", "gpt_oss"]
PARITY = 1e-4


def _maker():
    spec = importlib.util.spec_from_file_location("make_fixtures",
                                                  os.path.join(FIX, "make_fixtures.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _fresh(family, seed=5, variant="fresh"):
    import torch
    from transformers import AutoModelForCausalLM

    mk = _maker()
    torch.manual_seed(seed)
    cfg = mk.build_configs(mk.VARIANTS[variant])[family]
    # Eager experts (a loop over experts, as the modeling code writes it): they also run in
    # float64, the exact reference below.
    model = AutoModelForCausalLM.from_config(cfg, experts_implementation="eager").float().eval()
    model.generation_config.eos_token_id = None  # greedy runs the full 16 steps
    model.generation_config.pad_token_id = 0
    return model


def _ids(model, length=24, rows=2, seed=0):
    return np.random.default_rng(seed).integers(0, model.config.vocab_size, (rows, length))


def _logits(tmodel, ids):
    import torch

    with torch.no_grad():
        return tmodel(torch.from_numpy(ids)).logits.double().numpy()


def _diff(folder, tmodel, ids):
    """Max |logit diff| of our import of ``folder`` against ``tmodel`` run in float64 (the
    exact value of the same weights: transformers' own float32 logits differ from it by up
    to ~1.4e-4 on the fresh GPT-OSS checkpoint, more than ours do)."""
    import copy

    import torch

    model, params = load_hf(str(folder))
    ours = np.asarray(model.apply({"params": params}, ids.astype(np.int32)))
    with torch.no_grad():
        exact = copy.deepcopy(tmodel).double()(torch.from_numpy(ids)).logits.numpy()
    err = float(np.abs(ours - exact).max())
    # Ours must be within PARITY, or no further from the exact logits than transformers'
    # own float32 forward is (3.4e-4 on the bf16-rounded fresh GPT-OSS: 3 layers of
    # clamped experts at initializer_range 0.45).
    own = float(np.abs(_logits(tmodel, ids) - exact).max())
    assert err <= max(PARITY, own), f"{folder}: ours {err}, transformers fp32 {own}"
    return err, model, params


@pytest.mark.parametrize("family", FAMILIES)
def test_fresh_logits_and_greedy_tokens_equal_transformers(tmp_path, family):
    import torch

    tmodel = _fresh(family)
    tmodel.save_pretrained(tmp_path)
    ids = _ids(tmodel)  # 24 positions: past every fresh window (4 or 3)
    _, model, params = _diff(tmp_path, tmodel, ids)
    if family in ("mixtral", "qwen2_moe", "gpt_oss"):
        assert model.cfg.sliding_window is not None and model.cfg.sliding_window < 24
    prompt = ids[:1, :6]
    with torch.no_grad():
        theirs = tmodel.generate(torch.from_numpy(prompt), max_new_tokens=16, do_sample=False)
    ours = np.asarray(generate(model, params, prompt.astype(np.int32), 16))
    np.testing.assert_array_equal(ours[0], theirs[0, 6:].numpy())


@pytest.mark.parametrize("family", FAMILIES)
def test_bf16_saved_weights(tmp_path, family):
    import torch

    _fresh(family).to(torch.bfloat16).save_pretrained(tmp_path)
    with open(tmp_path / "config.json") as f:
        assert json.load(f)["dtype"] == "bfloat16"
    # The reference: the same weights rounded to bf16, computed in float64 (buffers such as
    # RoPE frequencies keep their full precision, as in a model loaded in float32).
    ref = _fresh(family)
    with torch.no_grad():
        for p in ref.parameters():
            p.copy_(p.to(torch.bfloat16).float())
    _diff(tmp_path, ref, _ids(ref))


@pytest.mark.parametrize("family", ["qwen2_moe", "gpt_oss"])
def test_sharded_index(tmp_path, family):
    tmodel = _fresh(family)
    tmodel.save_pretrained(tmp_path, max_shard_size="60KB")
    assert (tmp_path / "model.safetensors.index.json").exists()
    assert len([f for f in os.listdir(tmp_path) if f.endswith(".safetensors")]) > 1
    _diff(tmp_path, tmodel, _ids(tmodel))


@pytest.mark.parametrize("family", ["qwen3_moe", "mixtral"])
def test_block_fp8_against_transformers_dequantization(tmp_path, family):
    """Every projection quantized to float8 e4m3 in [16, 16] blocks (scale = amax / 448),
    dequantized by transformers' own ``_dequantize_fp8_weight`` into the torch model."""
    import torch
    from safetensors.torch import load_file, save_file
    from transformers.integrations.finegrained_fp8 import _dequantize_fp8_weight

    block = [16, 16]
    tmodel = _fresh(family)
    tmodel.save_pretrained(tmp_path)
    state = load_file(str(tmp_path / "model.safetensors"))
    quant, deq = {}, {}
    for k, w in state.items():
        if not (k.endswith("proj.weight") or k.endswith((".w1.weight", ".w2.weight",
                                                         ".w3.weight"))) or w.ndim != 2:
            quant[k] = w
            continue
        o, i = w.shape
        go, gi = -(-o // block[0]), -(-i // block[1])
        pad = torch.zeros(go * block[0], gi * block[1])
        pad[:o, :i] = w.abs()
        amax = pad.reshape(go, block[0], gi, block[1]).amax(dim=(1, 3)).clamp(min=1e-12)
        scale = amax / 448.0
        full = scale.repeat_interleave(block[0], 0)[:o].repeat_interleave(block[1], 1)[:, :i]
        quant[k] = (w / full).to(torch.float8_e4m3fn)
        quant[k + "_scale_inv"] = scale
        deq[k] = _dequantize_fp8_weight(quant[k], scale, block, torch.float32)
    # transformers' model of the dequantized weights, read by its own loader (the saved
    # names of packed experts differ from the in-memory ones).
    from transformers import AutoModelForCausalLM

    ref_dir = tmp_path / "ref"
    ref_dir.mkdir()
    save_file({k: deq.get(k, v) for k, v in state.items()}, str(ref_dir / "model.safetensors"),
              metadata={"format": "pt"})
    cfg = json.loads((tmp_path / "config.json").read_text())
    (ref_dir / "config.json").write_text(json.dumps(cfg))
    ref_model = AutoModelForCausalLM.from_pretrained(
        str(ref_dir), dtype=torch.float32, experts_implementation="eager").eval()
    save_file(quant, str(tmp_path / "model.safetensors"), metadata={"format": "pt"})
    cfg["quantization_config"] = {"quant_method": "fp8", "fmt": "e4m3",
                                  "activation_scheme": "dynamic", "weight_block_size": block}
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    ids = _ids(tmodel)
    assert np.abs(_logits(ref_model, ids) - _logits(tmodel, ids)).max() > 1e-3  # quantized
    _diff(tmp_path, ref_model, ids)


def test_mxfp4_experts_against_transformers_dequantization(tmp_path):
    """GPT-OSS's experts as MXFP4 blocks, dequantized by transformers'
    ``convert_moe_packed_tensors`` into the torch model."""
    import torch
    from safetensors.torch import load_file, save_file
    from test_hf_config import _quantize_mxfp4
    from transformers.integrations.mxfp4 import convert_moe_packed_tensors

    tmodel = _fresh("gpt_oss", variant="fixture")  # d_model 32: one MXFP4 block a row
    tmodel.save_pretrained(tmp_path)
    state = load_file(str(tmp_path / "model.safetensors"))
    quant = dict(state)
    params = dict(tmodel.named_parameters())
    for k in [k for k in state if k.endswith(("experts.gate_up_proj", "experts.down_proj"))]:
        stored = np.swapaxes(state[k].numpy(), -1, -2)
        blocks, scales, _ = _quantize_mxfp4(stored)
        del quant[k]
        quant[k + "_blocks"] = torch.from_numpy(blocks)
        quant[k + "_scales"] = torch.from_numpy(scales)
        with torch.no_grad():
            params[k].copy_(convert_moe_packed_tensors(quant[k + "_blocks"],
                                                       quant[k + "_scales"],
                                                       dtype=torch.float32))
    save_file(quant, str(tmp_path / "model.safetensors"), metadata={"format": "pt"})
    cfg = json.loads((tmp_path / "config.json").read_text())
    cfg["quantization_config"] = {"quant_method": "mxfp4"}
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    _diff(tmp_path, tmodel, _ids(tmodel))
