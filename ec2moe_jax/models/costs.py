"""Analytic per-layer costs of an MoE LM: weights (bytes) and work (FLOPs) per token.

Shape legend: L layers, E experts, K top-k, D model, F expert hidden, V vocab, H heads,
Hk key/value heads, Dh head dim.

One definition shared by hardware-aware expert selection (what fits in memory) and the
scheduler's cost model (how long a stage takes). FLOPs count a multiply-add as 2; norms,
softmax and RoPE are omitted (O(D) per token, under 1% of a layer at our sizes).
"""

from __future__ import annotations

import dataclasses

import numpy as np

from ec2moe_jax.config import ModelConfig
from ec2moe_jax.layers.quant import QuantSpec

DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2, "int8": 1}


@dataclasses.dataclass(frozen=True)
class ModelCosts:
    """Weights and per-token work of every layer of one model, at one weight dtype.

    Attributes:
      num_layers: L.
      num_experts: E routed experts per MoE layer.
      top_k: K experts each token uses in an MoE layer.
      d_model: D (the hidden state crossing a split is D values per token).
      weight_bytes: bytes per stored weight.
      is_moe: <bool>[L] which layers route over experts.
      fixed_bytes: <float64>[L] weights a layer needs whatever experts it keeps: attention,
        norms, router, shared expert (MoE layers) or the dense FFN (dense layers).
      expert_bytes: weights of one routed expert (``3 D F`` values).
      fixed_flops: <float64>[L] FLOPs per token of the fixed part, excluding attention over
        the context (see ``attention_flops_per_position``).
      expert_flops: FLOPs per token for one chosen expert (``6 D F``).
      attention_flops_per_position: FLOPs per token per attended position (``4 H Dh``:
        scores and weighted values), the same in every layer.
      kv_bytes_per_position: KV-cache bytes per cached position per layer (``2 Hk Dh``).
      embed_bytes: token embedding table (held by whoever runs layer 0).
      head_bytes: final norm and LM head (held by whoever runs the last layer; 0 when tied).
      head_flops: FLOPs per token of the LM head (``2 D V``).
    """

    num_layers: int
    num_experts: int
    top_k: int
    d_model: int
    weight_bytes: int
    is_moe: np.ndarray
    fixed_bytes: np.ndarray
    expert_bytes: float
    fixed_flops: np.ndarray
    expert_flops: float
    attention_flops_per_position: float
    kv_bytes_per_position: float
    embed_bytes: float
    head_bytes: float
    head_flops: float

    def layer_flops(self, context: float = 0.0) -> np.ndarray:
        """<float64>[L] FLOPs per token of each layer, attending over ``context`` positions."""
        moe = np.where(self.is_moe, self.top_k * self.expert_flops, 0.0)
        return self.fixed_flops + moe + self.attention_flops_per_position * context

    def layer_bytes(self, resident: np.ndarray | None = None) -> np.ndarray:
        """<float64>[L] weight bytes of each layer holding ``resident`` [L] experts (all E by
        default; ignored for dense layers)."""
        n = np.full(self.num_layers, self.num_experts) if resident is None else resident
        return self.fixed_bytes + np.where(self.is_moe, n, 0) * self.expert_bytes

    def bytes_touched_per_token(self) -> np.ndarray:
        """<float64>[L] weight bytes one token reads in each layer during decoding (fixed part
        plus its K experts): the memory-bandwidth side of the roofline."""
        return self.fixed_bytes + np.where(self.is_moe, self.top_k * self.expert_bytes, 0.0)


def model_costs(cfg: ModelConfig, weight_dtype: str | None = None,
                experts: QuantSpec | None = None) -> ModelCosts:
    """Costs of the model ``cfg`` with weights stored as ``weight_dtype`` (default: its dtype).

    Args:
      experts: how routed experts are stored, when not as ``weight_dtype``: bf16 or
        weight-only int8/int4 (:class:`~ec2moe_jax.layers.quant.QuantSpec`); ``expert_bytes``
        is then that format's exact size, scales included (the end device's view: what
        expert selection fits into its memory).

    Raises:
      ValueError: for an unknown ``weight_dtype``, or a group size that does not divide
        the expert's input axes.
    """
    weight_dtype = weight_dtype or cfg.dtype
    if weight_dtype not in DTYPE_BYTES:
        raise ValueError(f"{weight_dtype=!r} unknown; use one of {sorted(DTYPE_BYTES)}")
    wb = DTYPE_BYTES[weight_dtype]
    d, h, hk, dh = cfg.d_model, cfg.num_heads, cfg.kv_heads, cfg.dim_per_head
    moe = cfg.moe
    attn_params = d * h * dh + 2 * d * hk * dh + h * dh * d
    if cfg.attention_bias != "none":
        attn_params += (h + 2 * hk) * dh + (d if cfg.attention_bias == "all" else 0)
    norms = 2 * d
    is_moe = np.array([cfg.is_moe_layer(i) for i in range(cfg.num_layers)])
    shared = 3 * d * moe.shared_expert_dim + (d if moe.shared_expert_gate else 0)
    moe_fixed = d * moe.num_experts + shared  # router + shared expert
    dense_ffn = 3 * d * cfg.d_ff
    fixed_params = attn_params + norms + np.where(is_moe, moe_fixed, dense_ffn)
    # 2 FLOPs per weight per token for every matmul weight the token touches.
    fixed_flops = 2.0 * (attn_params + np.where(is_moe, moe_fixed, dense_ffn))
    expert_params = 3 * d * moe.expert_dim
    expert_bytes = float(expert_params * wb)
    if experts is not None:
        f = moe.expert_dim
        expert_bytes = float(experts.expert_bytes(d, f))
    head_params = 0 if cfg.tie_embeddings else d * cfg.vocab_size
    return ModelCosts(
        num_layers=cfg.num_layers,
        num_experts=moe.num_experts,
        top_k=moe.top_k,
        d_model=d,
        weight_bytes=wb,
        is_moe=is_moe,
        fixed_bytes=fixed_params.astype(np.float64) * wb,
        expert_bytes=expert_bytes,
        fixed_flops=fixed_flops.astype(np.float64),
        expert_flops=2.0 * expert_params,
        attention_flops_per_position=4.0 * h * dh,
        kv_bytes_per_position=float(2 * hk * dh * DTYPE_BYTES[cfg.dtype]),
        embed_bytes=float(cfg.vocab_size * d * wb),
        head_bytes=float((head_params + d) * wb),
        head_flops=2.0 * d * cfg.vocab_size,
    )
