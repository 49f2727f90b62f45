"""Import Hugging Face MoE checkpoints (Mixtral, OLMoE, Qwen2-MoE, Qwen3-MoE) without torch.

``load_hf(folder) -> (model, params)`` reads ``config.json`` and the safetensors weights
(one file or shards) and maps them onto :class:`~ec2moe_jax.models.MoELM`, so that
``model.apply({"params": params}, token_ids)`` returns the same logits as transformers.
Experts may be stored one tensor per expert (what ``save_pretrained`` writes) or packed as
``[E, ...]`` tensors (``experts.gate_up_proj`` / ``experts.down_proj``, or separate packed
``gate_proj`` / ``up_proj`` / ``down_proj``).

Family differences handled here: Mixtral always renormalises the top-k weights; OLMoE applies
RMSNorm to the whole q/k projections and does not renormalise (``norm_topk_prob``);
Qwen2-MoE has q/k/v biases, dense layers (``mlp_only_layers``, ``decoder_sparse_step``) and a
shared expert with a sigmoid gate; Qwen3-MoE has a per-head q/k RMSNorm.
"""

from __future__ import annotations

import json
import math
import os
from typing import Any

import jax
import numpy as np

from ec2moe_jax.config import ModelConfig, MoEConfig
from ec2moe_jax.models.lm import MoELM
from ec2moe_jax.models.safetensors_io import read_checkpoint

SUPPORTED = ("mixtral", "olmoe", "qwen2_moe", "qwen3_moe")
_IGNORED_SUFFIXES = ("rotary_emb.inv_freq",)


class UnsupportedCheckpoint(ValueError):
    """The checkpoint uses an architecture, key or option we do not implement."""


def _get(c: dict, *keys: str, default: Any = None) -> Any:
    for k in keys:
        if c.get(k) is not None:
            return c[k]
    return default


def _reject(cond: bool, msg: str) -> None:
    if cond:
        raise UnsupportedCheckpoint(msg)


def model_config_from_hf(c: dict, dispatch: str = "einsum") -> ModelConfig:
    """Converts a transformers ``config.json`` dict into our :class:`ModelConfig`."""
    family = c.get("model_type")
    _reject(family not in SUPPORTED,
            f"unsupported architecture model_type={family!r}; supported: {', '.join(SUPPORTED)}")
    _reject(c.get("hidden_act", "silu") != "silu",
            f"hidden_act={c.get('hidden_act')!r} is not supported (only 'silu')")
    rope = c.get("rope_parameters") or {}
    _reject(c.get("rope_scaling") not in (None, {}) or rope.get("rope_type", "default") !=
            "default", f"rope scaling {c.get('rope_scaling') or rope} is not supported")
    _reject(c.get("clip_qkv") is not None, f"clip_qkv={c.get('clip_qkv')} is not supported")
    window = c.get("sliding_window")
    uses_window = c.get("use_sliding_window", family == "mixtral")
    _reject(bool(window) and uses_window,
            f"sliding_window={window} is not supported (full attention only)")
    _reject(c.get("mlp_bias", False), "mlp_bias=True is not supported")

    layers = int(c["num_hidden_layers"])
    experts = int(_get(c, "num_local_experts", "num_experts", default=0))
    _reject(experts < 1, f"num_experts={experts}: not a MoE checkpoint")
    qwen = family in ("qwen2_moe", "qwen3_moe")
    if qwen:
        step = int(c.get("decoder_sparse_step", 1))
        dense = set(c.get("mlp_only_layers") or [])
        moe_layers = tuple(i for i in range(layers) if i not in dense and (i + 1) % step == 0)
        expert_dim = int(c["moe_intermediate_size"])
    else:
        moe_layers = tuple(range(layers))
        expert_dim = int(c["intermediate_size"])
    # transformers' default for norm_topk_prob is False in all three other families.
    renormalize = True if family == "mixtral" else bool(c.get("norm_topk_prob", False))
    if family == "qwen2_moe":
        bias = "qkv" if c.get("qkv_bias", True) else "none"
    else:
        bias = "all" if c.get("attention_bias", False) else "none"
    shared = int(c.get("shared_expert_intermediate_size") or 0) if family == "qwen2_moe" else 0
    heads = int(c["num_attention_heads"])
    hidden = int(c["hidden_size"])
    moe = MoEConfig(
        num_experts=experts,
        top_k=int(c["num_experts_per_tok"]),
        expert_dim=expert_dim,
        capacity_factor=None,  # transformers routes dropless
        eval_capacity_factor=None,
        renormalize=renormalize,
        aux_loss_coef=float(c.get("router_aux_loss_coef", 0.01)),
        z_loss_coef=0.0,
        shared_expert_dim=shared,
        shared_expert_gate=shared > 0,
        dispatch=dispatch,
    )
    return ModelConfig(
        vocab_size=int(c["vocab_size"]),
        d_model=hidden,
        num_layers=layers,
        num_heads=heads,
        num_kv_heads=int(c.get("num_key_value_heads") or heads),
        head_dim=int(c.get("head_dim") or hidden // heads),
        d_ff=int(c["intermediate_size"]),
        moe_layers=None if len(moe_layers) == layers else moe_layers,
        max_seq_len=int(c.get("max_position_embeddings", 4096)),
        rope_theta=float(_get(c, "rope_theta", default=rope.get("rope_theta", 10000.0))),
        norm_eps=float(c.get("rms_norm_eps", 1e-6)),
        tie_embeddings=bool(c.get("tie_word_embeddings", False)),
        attention_bias=bias,
        qk_norm={"olmoe": "full", "qwen3_moe": "head"}.get(family, "none"),
        moe=moe,
    ).validate()


class _Tensors:
    """Pops HF tensors by name with clear errors for missing ones; tracks leftovers."""

    def __init__(self, tensors: dict[str, np.ndarray], folder: str):
        self.t = dict(tensors)
        self.folder = folder

    def has(self, name: str) -> bool:
        return name in self.t

    def pop(self, name: str) -> np.ndarray:
        if name not in self.t:
            raise UnsupportedCheckpoint(f"missing tensor {name!r} in {self.folder!r}")
        return np.asarray(self.t.pop(name), np.float32)

    def leftovers(self) -> list[str]:
        return sorted(k for k in self.t if not k.endswith(_IGNORED_SUFFIXES))


def _experts(t: _Tensors, pre: str, e: int) -> dict[str, np.ndarray]:
    """Stacked expert weights w_gate/w_up [E, D, F] and w_down [E, F, D]."""
    if t.has(pre + "experts.gate_up_proj"):  # packed [E, 2F, D] (transformers 5 in memory)
        gu = t.pop(pre + "experts.gate_up_proj")
        f = gu.shape[1] // 2
        down = t.pop(pre + "experts.down_proj")  # [E, D, F]
        return {"w_gate": gu[:, :f].transpose(0, 2, 1), "w_up": gu[:, f:].transpose(0, 2, 1),
                "w_down": down.transpose(0, 2, 1)}
    if t.has(pre + "experts.gate_proj"):  # packed separately, [E, F, D] / [E, D, F]
        return {"w_gate": t.pop(pre + "experts.gate_proj").transpose(0, 2, 1),
                "w_up": t.pop(pre + "experts.up_proj").transpose(0, 2, 1),
                "w_down": t.pop(pre + "experts.down_proj").transpose(0, 2, 1)}
    names = ("w1", "w3", "w2") if t.has(pre + "experts.0.w1.weight") else (
        "gate_proj", "up_proj", "down_proj")
    stack = {k: [] for k in ("w_gate", "w_up", "w_down")}
    for i in range(e):
        for key, hf in zip(stack, names, strict=True):
            stack[key].append(t.pop(f"{pre}experts.{i}.{hf}.weight").T)
    return {k: np.stack(v) for k, v in stack.items()}


def _swiglu(t: _Tensors, pre: str) -> dict[str, np.ndarray]:
    return {"w_gate": t.pop(pre + "gate_proj.weight").T, "w_up": t.pop(pre + "up_proj.weight").T,
            "w_down": t.pop(pre + "down_proj.weight").T}


def _layer(t: _Tensors, cfg: ModelConfig, i: int) -> dict:
    pre = f"model.layers.{i}."
    h, hk, dh, d = cfg.num_heads, cfg.kv_heads, cfg.dim_per_head, cfg.d_model
    attn = {}
    for ours, hf, heads in (("wq", "q", h), ("wk", "k", hk), ("wv", "v", hk)):
        attn[ours] = t.pop(f"{pre}self_attn.{hf}_proj.weight").T.reshape(d, heads, dh)
        if cfg.attention_bias != "none":
            attn["b" + ours[1:]] = t.pop(f"{pre}self_attn.{hf}_proj.bias").reshape(heads, dh)
    attn["wo"] = t.pop(f"{pre}self_attn.o_proj.weight").T.reshape(h, dh, d)
    if cfg.attention_bias == "all":
        attn["bo"] = t.pop(f"{pre}self_attn.o_proj.bias")
    if cfg.qk_norm != "none":
        attn["q_norm"] = {"scale": t.pop(f"{pre}self_attn.q_norm.weight")}
        attn["k_norm"] = {"scale": t.pop(f"{pre}self_attn.k_norm.weight")}
    out = {"attn": attn,
           "attn_norm": {"scale": t.pop(pre + "input_layernorm.weight")},
           "ffn_norm": {"scale": t.pop(pre + "post_attention_layernorm.weight")}}
    if not cfg.is_moe_layer(i):
        out["mlp"] = _swiglu(t, pre + "mlp.")
        return out
    mlp = pre + ("block_sparse_moe." if t.has(pre + "block_sparse_moe.gate.weight") else "mlp.")
    moe = {"router": t.pop(mlp + "gate.weight").T, **_experts(t, mlp, cfg.moe.num_experts)}
    if cfg.moe.shared_expert_dim:
        moe["shared_expert"] = _swiglu(t, mlp + "shared_expert.")
        moe["shared_gate"] = t.pop(mlp + "shared_expert_gate.weight").T
    out["moe"] = moe
    return out


def _check_shapes(ours, expected, path=""):
    if isinstance(expected, dict):
        missing = sorted(set(expected) - set(ours))
        if missing:
            raise UnsupportedCheckpoint(f"no tensor maps onto {path}{missing}")
        for k in expected:
            _check_shapes(ours[k], expected[k], f"{path}{k}/")
        return
    if tuple(ours.shape) != tuple(expected.shape):
        raise UnsupportedCheckpoint(f"tensor for {path[:-1]} has shape {tuple(ours.shape)}, "
                                    f"the config implies {tuple(expected.shape)}")


def load_hf(folder: str, *, dispatch: str = "einsum", mesh=None) -> tuple[MoELM, dict]:
    """Loads a Hugging Face MoE folder into ``(model, params)`` (float32).

    Args:
      folder: directory with ``config.json`` and safetensors weights.
      dispatch: our MoE dispatch implementation for the imported model.
      mesh: optionally place the parameters on this mesh (experts on its 'expert' axis).

    Raises:
      UnsupportedCheckpoint: unsupported architecture or option, missing, misshapen or
        unexpected tensors (the message names them).
    """
    path = os.path.join(folder, "config.json")
    if not os.path.exists(path):
        raise FileNotFoundError(f"no config.json in {folder!r}")
    with open(path) as f:
        hf_cfg = json.load(f)
    cfg = model_config_from_hf(hf_cfg, dispatch)
    t = _Tensors(read_checkpoint(folder), folder)
    params = {"embedding": t.pop("model.embed_tokens.weight"),
              "final_norm": {"scale": t.pop("model.norm.weight")}}
    for i in range(cfg.num_layers):
        params[f"layer_{i}"] = _layer(t, cfg, i)
    if not cfg.tie_embeddings:
        params["lm_head"] = t.pop("lm_head.weight").T
    left = t.leftovers()
    if left:
        raise UnsupportedCheckpoint(f"unexpected tensors we do not know how to map: "
                                    f"{left[:8]}{' ...' if len(left) > 8 else ''}")
    model = MoELM(cfg)
    from ec2moe_jax.sharding import param_shardings, unbox

    tokens = np.zeros((1, min(8, cfg.max_seq_len)), np.int32)
    boxed = jax.eval_shape(lambda: model.init(jax.random.key(0), tokens)["params"])
    _check_shapes(params, unbox(boxed))
    if mesh is not None:
        return model, jax.device_put(params, param_shardings(boxed, mesh))
    return model, jax.tree.map(jax.numpy.asarray, params)


REFERENCE_FILE = "reference.npz"  # token_ids [B, T] and transformers' logits [B, T, V]


def reference_parity(folder: str, **load_kw) -> tuple[dict, MoELM, dict]:
    """Imports ``folder`` and compares its logits with the reference logits transformers
    computed for the same checkpoint (``<folder>/reference.npz``, written by
    ``tests/fixtures/hf/make_fixtures.py``).

    Returns:
      ``(record, model, params)``; ``record`` holds ``max_abs_logit_diff`` (float32 logits,
      this backend), ``logit_abs_max`` (the scale of the logits) and the model's shape.

    Raises:
      FileNotFoundError: ``folder`` has no ``reference.npz``.
    """
    path = os.path.join(folder, REFERENCE_FILE)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path!r} not found: parity needs transformers' logits saved "
                                "next to the checkpoint (tests/fixtures/hf/make_fixtures.py "
                                "writes them)")
    model, params = load_hf(folder, **load_kw)
    with np.load(path, allow_pickle=False) as ref:
        ids, expected = ref["token_ids"], ref["logits"]
    out = np.asarray(model.apply({"params": params}, ids))
    c = model.cfg
    record = {"max_abs_logit_diff": float(np.abs(out - expected).max()),
              "logit_abs_max": float(np.abs(expected).max()),
              "shape": {"d_model": c.d_model, "layers": c.num_layers,
                        "experts": c.moe.num_experts, "top_k": c.moe.top_k,
                        "heads": c.num_heads, "kv_heads": c.kv_heads}}
    return record, model, params


def num_params(params) -> int:
    return int(sum(math.prod(np.shape(x)) for x in jax.tree.leaves(params)))


def experiment_config(model_cfg: ModelConfig, name: str):
    """An :class:`ExperimentConfig` around an imported model (for workdirs and meshes)."""
    from ec2moe_jax.config import DataConfig, ExperimentConfig, MeshConfig, TrainConfig

    shards = 2 if model_cfg.moe.num_experts % 2 == 0 else 1
    seq = min(128, model_cfg.max_seq_len)
    return ExperimentConfig(
        name=name, data=DataConfig(), model=model_cfg,
        mesh=MeshConfig(cloud_expert_shards=shards),
        train=TrainConfig(seq_len=seq, eval_stride=None),
    ).validate()
