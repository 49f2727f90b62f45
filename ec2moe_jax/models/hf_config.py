"""Translating a transformers ``config.json`` into our :class:`ModelConfig`.

A key absent from ``config.json`` takes the value transformers' config class of that family
gives it (``FAMILY_DEFAULTS``, copied from the dataclass fields of ``MixtralConfig``,
``OlmoeConfig``, ``Qwen2MoeConfig``, ``Qwen3MoeConfig``, ``GraniteMoeConfig`` in
transformers 5.24; ``tests/test_hf_config.py`` compares the table with the installed
transformers under ``-m torch``). ``rope_theta`` falls back to the class's ``default_theta``
(1e6 for Mixtral, 1e4 elsewhere), as transformers' ``convert_rope_params_to_dict`` does.
"""

from __future__ import annotations

import os
from typing import Any

from ec2moe_jax.config import ModelConfig, MoEConfig

SUPPORTED = ("mixtral", "olmoe", "qwen2_moe", "qwen3_moe", "granitemoe", "gpt_oss")


class UnsupportedCheckpoint(ValueError):
    """The checkpoint uses an architecture, key or option we do not implement."""


# transformers 5.24 per-family defaults of every key the importer reads (None: the field's
# default is None; "heads" for num_key_value_heads means "= num_attention_heads").
_COMMON = {"hidden_act": "silu", "tie_word_embeddings": False, "head_dim": None,
           "rope_parameters": None, "mlp_bias": False}
FAMILY_DEFAULTS: dict[str, dict[str, Any]] = {
    "mixtral": {**_COMMON, "vocab_size": 32000, "hidden_size": 4096,
                "intermediate_size": 14336, "num_hidden_layers": 32, "num_attention_heads": 32,
                "num_key_value_heads": 8, "max_position_embeddings": 4096 * 32,
                "rms_norm_eps": 1e-5, "sliding_window": None, "num_experts_per_tok": 2,
                "num_local_experts": 8, "router_aux_loss_coef": 0.001},
    "olmoe": {**_COMMON, "vocab_size": 50304, "hidden_size": 2048, "intermediate_size": 2048,
              "num_hidden_layers": 16, "num_attention_heads": 16, "num_key_value_heads": None,
              "max_position_embeddings": 4096, "rms_norm_eps": 1e-5, "attention_bias": False,
              "clip_qkv": None, "num_experts_per_tok": 8, "num_experts": 64,
              "router_aux_loss_coef": 0.01, "norm_topk_prob": False},
    "qwen2_moe": {**_COMMON, "vocab_size": 151936, "hidden_size": 2048,
                  "intermediate_size": 5632, "num_hidden_layers": 24, "num_attention_heads": 16,
                  "num_key_value_heads": 16, "max_position_embeddings": 32768,
                  "rms_norm_eps": 1e-6, "use_sliding_window": False, "sliding_window": 4096,
                  "max_window_layers": 28, "decoder_sparse_step": 1,
                  "moe_intermediate_size": 1408, "shared_expert_intermediate_size": 5632,
                  "num_experts_per_tok": 4, "num_experts": 60, "norm_topk_prob": False,
                  "router_aux_loss_coef": 0.001, "mlp_only_layers": None, "qkv_bias": True,
                  "layer_types": None},
    "qwen3_moe": {**_COMMON, "vocab_size": 151936, "hidden_size": 2048,
                  "intermediate_size": 6144, "num_hidden_layers": 24, "num_attention_heads": 32,
                  "num_key_value_heads": 4, "max_position_embeddings": 32768,
                  "rms_norm_eps": 1e-6, "attention_bias": False, "use_sliding_window": False,
                  "sliding_window": 4096, "decoder_sparse_step": 1,
                  "moe_intermediate_size": 768, "num_experts_per_tok": 8, "num_experts": 128,
                  "norm_topk_prob": False, "router_aux_loss_coef": 0.001,
                  "mlp_only_layers": None},
    "granitemoe": {**_COMMON, "vocab_size": 32000, "hidden_size": 4096,
                   "intermediate_size": 11008, "num_hidden_layers": 32,
                   "num_attention_heads": 32, "num_key_value_heads": None,
                   "max_position_embeddings": 2048, "rms_norm_eps": 1e-6,
                   "attention_bias": False, "embedding_multiplier": 1.0,
                   "logits_scaling": 1.0, "residual_multiplier": 1.0,
                   "attention_multiplier": 1.0, "num_local_experts": 8,
                   "num_experts_per_tok": 2, "router_aux_loss_coef": 0.001},
    "gpt_oss": {**_COMMON, "num_hidden_layers": 36, "num_local_experts": 128,
                "vocab_size": 201088, "hidden_size": 2880, "intermediate_size": 2880,
                "head_dim": 64, "num_attention_heads": 64, "num_key_value_heads": 8,
                "sliding_window": 128, "max_position_embeddings": 131072,
                "rms_norm_eps": 1e-5, "num_experts_per_tok": 4, "swiglu_alpha": 1.702,
                "swiglu_limit": 7.0, "router_aux_loss_coef": 0.001, "layer_types": None,
                "attention_bias": True},
}
# ``default_theta`` of each config class (transformers' RotaryEmbeddingConfigMixin: 1e4).
DEFAULT_THETA = {"mixtral": 1e6, "gpt_oss": 150000.0}
# GptOssConfig.__post_init__'s RoPE when config.json has none.
_GPT_OSS_ROPE = {"rope_type": "yarn", "factor": 32.0, "beta_fast": 32.0, "beta_slow": 1.0,
                 "truncate": False, "original_max_position_embeddings": 4096}
_EXPERTS_KEY = {"mixtral": "num_local_experts", "granitemoe": "num_local_experts",
                "gpt_oss": "num_local_experts"}


class _Reader:
    """``config.json`` values with the family's defaults, type-checked, errors naming the
    file and the key."""

    def __init__(self, c: dict, family: str, path: str):
        self.c, self.family, self.path = c, family, path

    def raw(self, key: str) -> Any:
        if key in self.c:
            return self.c[key]
        return FAMILY_DEFAULTS[self.family].get(key)

    def get(self, key: str, kind: type, *, none_ok: bool = False) -> Any:
        value = self.raw(key)
        if value is None and none_ok:
            return None
        if kind is float and isinstance(value, int) and not isinstance(value, bool):
            value = float(value)
        if not isinstance(value, kind) or (kind is not bool and isinstance(value, bool)):
            raise ValueError(f"{self.path}: field {key!r} must be {kind.__name__}, got "
                             f"{value!r}; fix the file or re-save it with transformers")
        return value


def _number(r: _Reader, rope: dict, key: str, default: float | None) -> float | None:
    value = rope.get(key, default)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int | float) or value <= 0:
        raise ValueError(f"{r.path}: field 'rope_parameters.{key}' must be a positive number, "
                         f"got {value!r}")
    return float(value)


def _rope(r: _Reader) -> dict[str, Any]:
    """ModelConfig's RoPE fields. ``rope_type`` "default" is plain RoPE (as in Qwen2.5 and
    Qwen3-2507 configs), "yarn" is YaRN (GPT-OSS); any other scaling is refused by name."""
    # transformers' convert_rope_params_to_dict: a legacy rope_scaling takes precedence.
    rope = r.c.get("rope_scaling") or r.c.get("rope_parameters")
    if rope is None and r.family == "gpt_oss":
        rope = dict(_GPT_OSS_ROPE)
    rope = rope or {}
    if not isinstance(rope, dict):
        raise ValueError(f"{r.path}: field 'rope_parameters' must be an object, got {rope!r}")
    kind = rope.get("rope_type", rope.get("type", "default"))
    if kind not in ("default", "yarn"):
        raise UnsupportedCheckpoint(f"{r.path}: rope scaling {rope} (rope_type={kind!r}) is "
                                    "not supported; only plain RoPE and 'yarn'")
    theta = rope.get("rope_theta", r.c.get("rope_theta"))
    if theta is None:
        theta = DEFAULT_THETA.get(r.family, 1e4)
    if isinstance(theta, bool) or not isinstance(theta, int | float) or theta <= 0:
        raise ValueError(f"{r.path}: field 'rope_theta' must be a positive number, got {theta!r}")
    out: dict[str, Any] = {"rope_theta": float(theta)}
    if kind == "default":
        return out
    odd = sorted(k for k in ("attention_factor", "mscale", "mscale_all_dim") if rope.get(k))
    if odd:
        raise UnsupportedCheckpoint(f"{r.path}: yarn with {odd} is not supported")
    max_len = r.get("max_position_embeddings", int)
    original = rope.get("original_max_position_embeddings", max_len)
    if isinstance(original, bool) or not isinstance(original, int) or original < 1:
        raise ValueError(f"{r.path}: field 'rope_parameters.original_max_position_embeddings' "
                         f"must be a positive integer, got {original!r}")
    factor = _number(r, rope, "factor", None) or max_len / original
    truncate = rope.get("truncate", True)
    if not isinstance(truncate, bool):
        raise ValueError(f"{r.path}: field 'rope_parameters.truncate' must be true or false, "
                         f"got {truncate!r}")
    return {**out, "rope_scaling": "yarn", "rope_factor": float(factor),
            "rope_original_max_len": original,
            "rope_beta_fast": _number(r, rope, "beta_fast", None) or 32.0,
            "rope_beta_slow": _number(r, rope, "beta_slow", None) or 1.0,
            "rope_truncate": truncate}


def _sliding(r: _Reader, layers: int) -> tuple[int | None, tuple[int, ...] | None]:
    """``(window, layers using it)`` with transformers' semantics per family: Mixtral slides
    whenever ``sliding_window`` is set; Qwen3-MoE only with ``use_sliding_window``; Qwen2-MoE
    follows ``layer_types`` (default: every even layer below ``max_window_layers`` when
    ``use_sliding_window``). Returns ``(None, None)`` for full attention everywhere."""
    if r.family in ("olmoe", "granitemoe"):
        return None, None
    if r.family == "mixtral":
        window = r.get("sliding_window", int, none_ok=True)
        return (window or None), None
    if r.family != "gpt_oss" and not r.get("use_sliding_window", bool):
        return None, None
    window = r.get("sliding_window", int, none_ok=True)
    if not window:
        return None, None
    if r.family == "qwen3_moe":
        return window, None
    types = r.raw("layer_types")
    if types is None and r.family == "gpt_oss":  # GptOssConfig: even layers slide
        types = ["sliding_attention" if (i + 1) % 2 else "full_attention"
                 for i in range(layers)]
    elif types is None:
        top = r.get("max_window_layers", int)
        types = ["sliding_attention" if (i + 1) % 2 and i < top else "full_attention"
                 for i in range(layers)]
    if not isinstance(types, list) or len(types) != layers:
        raise ValueError(f"{r.path}: field 'layer_types' must list {layers} layer kinds, got "
                         f"{types!r}")
    sliding = tuple(i for i, k in enumerate(types) if k == "sliding_attention")
    if not sliding:
        return None, None
    return window, (None if len(sliding) == layers else sliding)


def _gpt_oss_moe(r: _Reader) -> dict[str, Any]:
    """GPT-OSS's MoEConfig fields: router bias, biased clamped-SwiGLU experts."""
    if r.family != "gpt_oss":
        return {}
    return {"router_bias": True, "expert_bias": True, "expert_act": "swiglu_oss",
            "swiglu_alpha": r.get("swiglu_alpha", float),
            "swiglu_limit": r.get("swiglu_limit", float)}


def _moe_layers(r: _Reader, layers: int) -> tuple[int, ...]:
    if r.family not in ("qwen2_moe", "qwen3_moe"):
        return tuple(range(layers))
    step = r.get("decoder_sparse_step", int)
    dense = set(r.get("mlp_only_layers", list, none_ok=True) or [])
    return tuple(i for i in range(layers) if i not in dense and (i + 1) % step == 0)


def _refuse_unsupported(r: _Reader) -> None:
    act = r.raw("hidden_act")
    if act != "silu":
        raise UnsupportedCheckpoint(f"{r.path}: hidden_act={act!r} is not supported "
                                    "(only 'silu')")
    if r.raw("clip_qkv") is not None:
        raise UnsupportedCheckpoint(f"{r.path}: clip_qkv={r.raw('clip_qkv')} is not supported")
    if r.raw("mlp_bias"):
        raise UnsupportedCheckpoint(f"{r.path}: mlp_bias=True is not supported")


def model_config_from_hf(c: dict, dispatch: str = "einsum",
                         path: str = "config.json") -> ModelConfig:
    """Converts a transformers ``config.json`` dict into our :class:`ModelConfig`.

    Args:
      c: the parsed ``config.json``.
      dispatch: our MoE dispatch implementation.
      path: the file ``c`` came from (for messages).

    Raises:
      UnsupportedCheckpoint: an architecture or option we do not implement (named).
      ValueError: a field of the wrong type (the message names the file and the field).
    """
    if not isinstance(c, dict):
        raise ValueError(f"{path}: must hold a JSON object, got {type(c).__name__}")
    family = c.get("model_type")
    if family not in SUPPORTED:
        raise UnsupportedCheckpoint(f"{path}: unsupported architecture model_type={family!r}; "
                                    f"supported: {', '.join(SUPPORTED)}")
    r = _Reader(c, family, path)
    _refuse_unsupported(r)
    layers = r.get("num_hidden_layers", int)
    # config classes alias the two names (attribute_map); a saved config may hold either.
    key = next((k for k in ("num_local_experts", "num_experts") if c.get(k) is not None),
               _EXPERTS_KEY.get(family, "num_experts"))
    experts = r.get(key, int)
    if experts < 1:
        raise UnsupportedCheckpoint(f"{path}: num_experts={experts}: not a MoE checkpoint")
    moe_layers = _moe_layers(r, layers)
    qwen = family in ("qwen2_moe", "qwen3_moe")
    expert_dim = r.get("moe_intermediate_size" if qwen else "intermediate_size", int)
    # Mixtral, GraniteMoE and GPT-OSS always renormalise the top-k weights (softmax over
    # the top-k logits); the others follow norm_topk_prob.
    renormalize = family in ("mixtral", "granitemoe", "gpt_oss") or r.get("norm_topk_prob",
                                                                           bool)
    if family == "qwen2_moe":
        bias = "qkv" if r.get("qkv_bias", bool) else "none"
    elif family == "mixtral":
        bias = "none"
    else:
        bias = "all" if r.get("attention_bias", bool) else "none"
    shared = (r.get("shared_expert_intermediate_size", int, none_ok=True) or 0) \
        if family == "qwen2_moe" else 0
    heads = r.get("num_attention_heads", int)
    hidden = r.get("hidden_size", int)
    window, window_layers = _sliding(r, layers)
    moe = MoEConfig(
        num_experts=experts, top_k=r.get("num_experts_per_tok", int), expert_dim=expert_dim,
        capacity_factor=None, eval_capacity_factor=None,  # transformers routes dropless
        renormalize=renormalize, aux_loss_coef=r.get("router_aux_loss_coef", float),
        z_loss_coef=0.0, shared_expert_dim=shared, shared_expert_gate=shared > 0,
        dispatch=dispatch, **_gpt_oss_moe(r))
    extra = _rope(r)
    if family == "granitemoe":
        extra |= {"embedding_multiplier": r.get("embedding_multiplier", float),
                 "residual_multiplier": r.get("residual_multiplier", float),
                 "attention_multiplier": r.get("attention_multiplier", float),
                 "logits_scaling": r.get("logits_scaling", float)}
    return ModelConfig(
        vocab_size=r.get("vocab_size", int), d_model=hidden, num_layers=layers,
        num_heads=heads, num_kv_heads=r.get("num_key_value_heads", int, none_ok=True) or heads,
        head_dim=r.get("head_dim", int, none_ok=True) or hidden // heads,
        d_ff=r.get("intermediate_size", int),
        moe_layers=None if len(moe_layers) == layers else moe_layers,
        max_seq_len=r.get("max_position_embeddings", int), attention_sinks=family == "gpt_oss",
        norm_eps=r.get("rms_norm_eps", float),
        tie_embeddings=r.get("tie_word_embeddings", bool), attention_bias=bias,
        qk_norm={"olmoe": "full", "qwen3_moe": "head"}.get(family, "none"),
        sliding_window=window, sliding_layers=window_layers, moe=moe, **extra,
    ).validate()


def config_path(folder: str) -> str:
    return os.path.join(folder, "config.json")
