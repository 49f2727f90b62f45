"""Import Hugging Face MoE checkpoints (Mixtral, OLMoE, Qwen2-MoE, Qwen3-MoE, GraniteMoE)
without torch.

``load_hf(folder) -> (model, params)`` reads ``config.json`` and the safetensors weights
(one file or shards) and maps them onto :class:`~ec2moe_jax.models.MoELM`, so that
``model.apply({"params": params}, token_ids)`` returns the same logits as transformers.
Experts may be stored one tensor per expert (what ``save_pretrained`` writes) or packed as
``[E, ...]`` tensors (``experts.gate_up_proj`` / ``experts.down_proj``, or separate packed
``gate_proj`` / ``up_proj`` / ``down_proj``).

Family differences handled here: Mixtral always renormalises the top-k weights; OLMoE applies
RMSNorm to the whole q/k projections and does not renormalise (``norm_topk_prob``);
Qwen2-MoE has q/k/v biases, dense layers (``mlp_only_layers``, ``decoder_sparse_step``) and a
shared expert with a sigmoid gate; Qwen3-MoE has a per-head q/k RMSNorm; GraniteMoE scales
embeddings, attention scores, residual branches and logits, and stores its experts packed
(``input_linear`` / ``output_linear``). Config keys absent from ``config.json`` take
transformers' per-family defaults (:mod:`ec2moe_jax.models.hf_config`); block-FP8 weights
are dequantized at load (:mod:`ec2moe_jax.models.hf_quant`).
"""

from __future__ import annotations

import math
import os

import jax
import numpy as np

from ec2moe_jax.config import ModelConfig
from ec2moe_jax.files import read_json
from ec2moe_jax.models.hf_config import (
    SUPPORTED,
    UnsupportedCheckpoint,
    model_config_from_hf,
)
from ec2moe_jax.models.hf_quant import check_quantization, dequantize
from ec2moe_jax.models.lm import MoELM
from ec2moe_jax.models.safetensors_io import read_checkpoint

__all__ = ["SUPPORTED", "UnsupportedCheckpoint", "import_report", "load_hf",
           "model_config_from_hf", "read_hf_config", "reference_parity"]

_IGNORED_SUFFIXES = ("rotary_emb.inv_freq",)


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
    packed = [(pre + "experts.gate_up_proj", pre + "experts.down_proj"),  # transformers 5
              (pre + "input_linear.weight", pre + "output_linear.weight")]  # GraniteMoE
    found = [names for names in packed if t.has(names[0])]
    if found:  # packed [E, 2F, D] (gate rows, then up rows) and [E, D, F]
        gu = t.pop(found[0][0])
        f = gu.shape[1] // 2
        down = t.pop(found[0][1])
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


def _oss_experts(t: _Tensors, pre: str) -> dict[str, np.ndarray]:
    """GPT-OSS's experts: ``gate_up_proj`` [E, D, 2F] with gate and up interleaved (columns
    0::2 and 1::2) and its bias [E, 2F], ``down_proj`` [E, F, D] and its bias [E, D]."""
    gu, gub = t.pop(pre + "experts.gate_up_proj"), t.pop(pre + "experts.gate_up_proj_bias")
    return {"w_gate": gu[..., ::2], "w_up": gu[..., 1::2], "b_gate": gub[:, ::2],
            "b_up": gub[:, 1::2], "w_down": t.pop(pre + "experts.down_proj"),
            "b_down": t.pop(pre + "experts.down_proj_bias")}


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
    if cfg.attention_sinks:
        attn["sinks"] = t.pop(f"{pre}self_attn.sinks")
    if cfg.qk_norm != "none":
        attn["q_norm"] = {"scale": t.pop(f"{pre}self_attn.q_norm.weight")}
        attn["k_norm"] = {"scale": t.pop(f"{pre}self_attn.k_norm.weight")}
    out = {"attn": attn,
           "attn_norm": {"scale": t.pop(pre + "input_layernorm.weight")},
           "ffn_norm": {"scale": t.pop(pre + "post_attention_layernorm.weight")}}
    if not cfg.is_moe_layer(i):
        out["mlp"] = _swiglu(t, pre + "mlp.")
        return out
    mlp = pre + ("block_sparse_moe." if any(t.has(pre + f"block_sparse_moe.{r}.weight")
                                            for r in ("gate", "router.layer")) else "mlp.")
    router = mlp + ("router.layer.weight" if t.has(mlp + "router.layer.weight") else
                    "gate.weight")
    if cfg.moe.router_bias:  # GPT-OSS: mlp.router.{weight, bias}, biased experts
        moe = {"router": t.pop(mlp + "router.weight").T,
               "router_bias": t.pop(mlp + "router.bias"), **_oss_experts(t, mlp)}
    else:
        moe = {"router": t.pop(router).T, **_experts(t, mlp, cfg.moe.num_experts)}
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


def read_hf_config(folder: str) -> tuple[dict, str]:
    """``(config dict, path)`` of ``folder/config.json``.

    Raises:
      FileNotFoundError: no ``config.json``.
      ValueError: the file is not valid JSON or not an object (naming the file).
    """
    path = os.path.join(folder, "config.json")
    if not os.path.exists(path):
        raise FileNotFoundError(f"no config.json in {folder!r}")
    c = read_json(path, what="Hugging Face config")
    if not isinstance(c, dict):
        raise ValueError(f"Hugging Face config {path!r} must hold a JSON object, got "
                         f"{type(c).__name__}")
    return c, path


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
    hf_cfg, path = read_hf_config(folder)
    block = check_quantization(hf_cfg, path)
    cfg = model_config_from_hf(hf_cfg, dispatch, path)
    t = _Tensors(dequantize(read_checkpoint(folder), block, folder), folder)
    params = {"embedding": t.pop("model.embed_tokens.weight"),
              "final_norm": {"scale": t.pop("model.norm.weight")}}
    for i in range(cfg.num_layers):
        params[f"layer_{i}"] = _layer(t, cfg, i)
    if not cfg.tie_embeddings:
        params["lm_head"] = t.pop("lm_head.weight").T
    elif t.has("lm_head.weight"):
        # transformers ties the head to the embedding and ignores a stored copy; so do we,
        # after checking it is a copy (a different head would mean another model).
        head = t.pop("lm_head.weight")
        if head.shape != params["embedding"].shape or not np.array_equal(
                head, params["embedding"]):
            raise UnsupportedCheckpoint(
                f"{folder!r}: tie_word_embeddings=true but lm_head.weight differs from "
                "model.embed_tokens.weight; set tie_word_embeddings=false in config.json if "
                "the head is its own matrix")
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


def reference_parity(folder: str, *, greedy: bool = False,
                     **load_kw) -> tuple[dict, MoELM, dict]:
    """Imports ``folder`` and compares its logits with the reference logits transformers
    computed for the same checkpoint (``<folder>/reference.npz``, written by
    ``tests/fixtures/hf/make_fixtures.py``).

    Returns:
      ``(record, model, params)``; ``record`` holds ``max_abs_logit_diff`` (float32 logits,
      this backend), ``logit_abs_max`` (the scale of the logits) and the model's shape; with
      ``greedy`` and greedy tokens in the reference, ``greedy_tokens_equal`` (our KV-cache
      greedy decoding against transformers' ``generate``) and ``greedy_steps``.

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
        prompt, tokens = (ref[k] if k in ref else None
                          for k in ("greedy_prompt", "greedy_tokens"))
    out = np.asarray(model.apply({"params": params}, ids))
    c = model.cfg
    record = {"max_abs_logit_diff": float(np.abs(out - expected).max()),
              "logit_abs_max": float(np.abs(expected).max()),
              "shape": {"d_model": c.d_model, "layers": c.num_layers,
                        "experts": c.moe.num_experts, "top_k": c.moe.top_k,
                        "heads": c.num_heads, "kv_heads": c.kv_heads,
                        "sliding_window": c.sliding_window}}
    if greedy and tokens is not None:
        from ec2moe_jax.models.generate import generate

        ours = np.asarray(generate(model, params, prompt, tokens.shape[1]))
        record["greedy_steps"] = int(tokens.shape[1])
        record["greedy_tokens_equal"] = bool(np.array_equal(ours, tokens))
    return record, model, params


def num_params(params) -> int:
    return int(sum(math.prod(np.shape(x)) for x in jax.tree.leaves(params)))


_EXPERT_KEYS = ("w_gate", "w_up", "w_down", "b_gate", "b_up", "b_down")


def import_report(model: MoELM, params) -> dict:
    """What an import holds: parameter count, the routed experts' bytes per MoE layer (the
    weights a split plan keeps resident or streams: w_gate/w_up/w_down and their biases,
    not the router or a shared expert) and the dtype(s) the parameters are stored in."""
    cfg = model.cfg
    per_layer = {}
    for i in range(cfg.num_layers):
        moe = params[f"layer_{i}"].get("moe")
        if moe is not None:
            per_layer[i] = int(sum(np.dtype(moe[k].dtype).itemsize * math.prod(moe[k].shape)
                                   for k in _EXPERT_KEYS if k in moe))
    dtypes = sorted({str(np.dtype(x.dtype)) for x in jax.tree.leaves(params)})
    return {"params": num_params(params), "layers": cfg.num_layers,
            "moe_layers": len(per_layer), "experts": cfg.moe.num_experts,
            "top_k": cfg.moe.top_k,
            "expert_bytes_per_layer": per_layer[min(per_layer)] if per_layer else 0,
            "expert_bytes_total": int(sum(per_layer.values())),
            "stored_dtype": dtypes[0] if len(dtypes) == 1 else dtypes}


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
