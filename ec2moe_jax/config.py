"""Frozen, validated configuration dataclasses, one per component.

Named experiments live in ``configs/<name>.py`` as a plain nested dict with a comment on every
field; :func:`load_config` converts it once into these dataclasses and validates it, so a bad
value fails here, with the value in the message, and never deep inside a jitted function.
Each module receives only its own section (``ModelConfig``, ``MoEConfig``, ...).
"""

from __future__ import annotations

import ast
import dataclasses
import difflib
import importlib
import importlib.util
import os
from collections.abc import Sequence
from typing import Any

DISPATCHES = ("einsum", "gather", "ragged")
NAMED_CONFIGS = ("tiny", "small", "base")


def _check(cond: bool, msg: str) -> None:
    if not cond:
        raise ValueError(msg)


@dataclasses.dataclass(frozen=True)
class DataConfig:
    source: str = "shakespeare"  # "shakespeare" or a comma-separated list of UTF-8 text files
    cache_dir: str = "~/.cache/ec2moe_jax"  # where the downloaded corpus and cleaned text live
    val_fraction: float = 0.05  # per work, the slice after the training part
    test_fraction: float = 0.05  # per work, the last slice

    def validate(self) -> DataConfig:
        _check(bool(self.source), f"{self.source=!r} must name 'shakespeare' or text files")
        for name in ("val_fraction", "test_fraction"):
            v = getattr(self, name)
            _check(0.0 < v < 0.5, f"{name}={v} must lie in (0, 0.5)")
        return self


@dataclasses.dataclass(frozen=True)
class MoEConfig:
    num_experts: int = 8  # E: routed experts per MoE layer
    top_k: int = 2  # K: experts chosen per token
    expert_dim: int = 512  # F: hidden width of each SwiGLU expert
    capacity_factor: float | None = 1.25  # training capacity per expert; None = dropless
    eval_capacity_factor: float | None = None  # capacity when deterministic; None = dropless
    # (a finite value makes KV-cache decoding differ from the full forward: groups differ)
    renormalize: bool = True  # renormalise combine weights over the chosen experts (Mixtral)
    aux_loss_coef: float = 0.01  # load-balance loss weight (Switch Transformer eq. 4)
    z_loss_coef: float = 1e-3  # router z-loss weight (ST-MoE eq. 5)
    shared_expert_dim: int = 0  # width of an always-on shared expert; 0 = none
    shared_expert_gate: bool = False  # sigmoid gate on the shared expert (Qwen2-MoE)
    dispatch: str = "einsum"  # "einsum" (portable), "gather" (sort/gather), "ragged" (dropless)
    group_size: int | None = None  # tokens per routing group; None = one sequence per group

    def validate(self, expert_shards: int = 1) -> MoEConfig:
        _check(self.num_experts >= 1, f"{self.num_experts=} must be >= 1")
        _check(
            1 <= self.top_k <= self.num_experts,
            f"{self.top_k=} must lie in [1, num_experts={self.num_experts}]",
        )
        _check(self.expert_dim >= 1, f"{self.expert_dim=} must be >= 1")
        for name in ("capacity_factor", "eval_capacity_factor"):
            v = getattr(self, name)
            _check(v is None or v > 0, f"{name}={v} must be > 0 or None (dropless)")
        _check(self.dispatch in DISPATCHES, f"{self.dispatch=!r} must be one of {DISPATCHES}")
        _check(
            self.num_experts % expert_shards == 0,
            f"num_experts={self.num_experts} not divisible by expert_shards={expert_shards}; "
            "choose an expert axis size that divides the number of experts",
        )
        _check(self.group_size is None or self.group_size >= 1, f"{self.group_size=} must be >= 1")
        return self


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    vocab_size: int = 256  # V: byte-level tokenizer
    d_model: int = 256  # D
    num_layers: int = 4
    num_heads: int = 4
    num_kv_heads: int | None = None  # grouped-query attention; None = num_heads
    head_dim: int | None = None  # None = d_model // num_heads
    d_ff: int = 1024  # hidden width of the dense SwiGLU in non-MoE layers
    moe_layers: tuple[int, ...] | None = None  # which layers are MoE; None = all
    max_seq_len: int = 512  # KV cache length and the longest sequence the model accepts
    rope_theta: float = 10000.0
    norm_eps: float = 1e-6
    tie_embeddings: bool = False
    attention_bias: str = "none"  # "none", "qkv" (Qwen2-MoE) or "all" (q, k, v and output)
    qk_norm: str = "none"  # RMSNorm on q/k: "none", "head" (per head, Qwen3) or "full" (OLMoE)
    dtype: str = "float32"  # activation dtype; router maths always runs in float32
    moe: MoEConfig = dataclasses.field(default_factory=MoEConfig)

    @property
    def kv_heads(self) -> int:
        return self.num_kv_heads or self.num_heads

    @property
    def dim_per_head(self) -> int:
        return self.head_dim or self.d_model // self.num_heads

    def is_moe_layer(self, i: int) -> bool:
        return self.moe_layers is None or i in self.moe_layers

    def validate(self, expert_shards: int = 1) -> ModelConfig:
        for name in ("vocab_size", "d_model", "num_layers", "num_heads", "d_ff", "max_seq_len"):
            _check(getattr(self, name) >= 1, f"{name}={getattr(self, name)} must be >= 1")
        _check(
            self.head_dim is not None or self.d_model % self.num_heads == 0,
            f"d_model={self.d_model} not divisible by num_heads={self.num_heads}; set head_dim",
        )
        _check(
            self.num_heads % self.kv_heads == 0,
            f"num_heads={self.num_heads} not divisible by num_kv_heads={self.kv_heads}",
        )
        _check(self.dim_per_head % 2 == 0, f"head_dim={self.dim_per_head} must be even for RoPE")
        if self.moe_layers is not None:
            bad = [i for i in self.moe_layers if not 0 <= i < self.num_layers]
            _check(not bad, f"moe_layers {bad} outside [0, num_layers={self.num_layers})")
        _check(self.dtype in ("float32", "bfloat16"), f"{self.dtype=!r} must be float32/bfloat16")
        _check(self.attention_bias in ("none", "qkv", "all"),
               f"attention_bias={self.attention_bias!r} must be 'none', 'qkv' or 'all'")
        _check(self.qk_norm in ("none", "head", "full"),
               f"qk_norm={self.qk_norm!r} must be 'none', 'head' or 'full'")
        self.moe.validate(expert_shards)
        return self


@dataclasses.dataclass(frozen=True)
class MeshConfig:
    train_expert_shards: int = 1  # size of the 'expert' axis of the training mesh
    end_devices: int = 2  # devices of the end submesh (taken first)
    cloud_devices: int = 6  # devices of the cloud submesh (taken next)
    cloud_expert_shards: int = 2  # size of the cloud's 'expert' axis; the rest is 'data'

    def validate(self) -> MeshConfig:
        for name in ("train_expert_shards", "end_devices", "cloud_devices", "cloud_expert_shards"):
            _check(getattr(self, name) >= 1, f"{name}={getattr(self, name)} must be >= 1")
        _check(
            self.cloud_devices % self.cloud_expert_shards == 0,
            f"cloud_devices={self.cloud_devices} not divisible by "
            f"cloud_expert_shards={self.cloud_expert_shards}",
        )
        return self


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    batch_size: int = 16  # B: sequences per step (global)
    seq_len: int = 128  # T: tokens per training sequence
    steps: int = 2000  # total optimiser steps (the cosine schedule spans them)
    schedule_steps: int | None = None  # steps the schedule spans; None = steps. Set when a
    # finished run is extended: the extra steps train on at the final learning rate
    learning_rate: float = 3e-3  # peak learning rate
    warmup_steps: int = 100  # linear warmup from 0 to the peak
    min_lr_ratio: float = 0.1  # final learning rate as a fraction of the peak
    weight_decay: float = 0.1  # AdamW decoupled weight decay
    b1: float = 0.9
    b2: float = 0.95
    clip_norm: float = 1.0  # global gradient-norm clipping
    seed: int = 0  # parameter init and data order
    eval_every: int = 250  # steps between held-out evaluations
    eval_batches: int = 16  # batches of the validation split per periodic evaluation
    eval_stride: int | None = None  # sliding-window eval: scored bytes see >= T - stride
    # bytes of context; None = non-overlapping windows (the first bytes of each see little)
    checkpoint_every: int = 250  # steps between orbax checkpoints
    keep_checkpoints: int = 2  # how many checkpoints to keep
    log_every: int = 25  # steps between JSON-lines metric records

    def validate(self) -> TrainConfig:
        for name in ("batch_size", "seq_len", "steps", "eval_every", "checkpoint_every",
                     "eval_batches", "log_every"):
            _check(getattr(self, name) >= 1, f"{name}={getattr(self, name)} must be >= 1")
        _check(self.learning_rate > 0, f"{self.learning_rate=} must be > 0")
        _check(0 <= self.warmup_steps < self.steps, f"{self.warmup_steps=} must be < {self.steps=}")
        _check(self.schedule_steps is None or self.warmup_steps < self.schedule_steps,
               f"train.schedule_steps={self.schedule_steps} must be > warmup_steps="
               f"{self.warmup_steps} (or None: the schedule spans train.steps)")
        _check(0.0 <= self.min_lr_ratio <= 1.0, f"{self.min_lr_ratio=} must lie in [0, 1]")
        _check(self.keep_checkpoints >= 1, f"{self.keep_checkpoints=} must be >= 1")
        _check(
            self.eval_stride is None or 1 <= self.eval_stride <= self.seq_len,
            f"train.eval_stride={self.eval_stride} must lie in [1, seq_len={self.seq_len}]",
        )
        return self


@dataclasses.dataclass(frozen=True)
class ExperimentConfig:
    name: str
    data: DataConfig
    model: ModelConfig
    mesh: MeshConfig
    train: TrainConfig

    def validate(self) -> ExperimentConfig:
        self.data.validate()
        self.mesh.validate()
        self.model.validate(expert_shards=self.mesh.train_expert_shards)
        self.model.moe.validate(expert_shards=self.mesh.cloud_expert_shards)
        self.train.validate()
        _check(
            self.train.seq_len <= self.model.max_seq_len,
            f"train.seq_len={self.train.seq_len} exceeds model.max_seq_len="
            f"{self.model.max_seq_len}",
        )
        return self

    def replace(self, **sections: Any) -> ExperimentConfig:
        """Returns a copy with whole sections or ``section__field`` overrides replaced."""
        updates: dict[str, Any] = {}
        for key, value in sections.items():
            if "__" in key:
                section, field = key.split("__", 1)
                base = updates.get(section, getattr(self, section))
                if section == "model" and field.startswith("moe__"):
                    moe = dataclasses.replace(base.moe, **{field[5:]: value})
                    updates[section] = dataclasses.replace(base, moe=moe)
                else:
                    updates[section] = dataclasses.replace(base, **{field: value})
            else:
                updates[key] = value
        return dataclasses.replace(self, **updates).validate()


def _build(cls: type, values: dict[str, Any], where: str) -> Any:
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - known)
    _check(not unknown, f"unknown field(s) {unknown} in config section {where!r}; known: "
           f"{sorted(known)}")
    return cls(**values)


def from_dict(name: str, d: dict[str, Any]) -> ExperimentConfig:
    """Converts a nested dict (the shape of ``configs/*.py``) into a validated config."""
    model = dict(d.get("model", {}))
    moe = _build(MoEConfig, model.pop("moe", {}), "model.moe")
    if model.get("moe_layers") is not None:
        model["moe_layers"] = tuple(model["moe_layers"])
    return ExperimentConfig(
        name=name,
        data=_build(DataConfig, d.get("data", {}), "data"),
        model=_build(ModelConfig, {**model, "moe": moe}, "model"),
        mesh=_build(MeshConfig, d.get("mesh", {}), "mesh"),
        train=_build(TrainConfig, d.get("train", {}), "train"),
    ).validate()


def config_keys(cfg: ExperimentConfig) -> list[str]:
    """Every overridable field as a dotted key ("model.moe.num_experts", "train.steps", ...)."""
    keys = []
    for section in ("data", "model", "mesh", "train"):
        for f in dataclasses.fields(getattr(cfg, section)):
            if f.name == "moe":
                keys += [f"model.moe.{g.name}" for g in dataclasses.fields(MoEConfig)]
            else:
                keys.append(f"{section}.{f.name}")
    return keys


def config_value(cfg: ExperimentConfig, key: str) -> Any:
    """The value of a dotted key ("model.moe.num_experts") in ``cfg``."""
    value: Any = cfg
    for part in key.split("."):
        value = getattr(value, part)
    return value


def config_diff(old: ExperimentConfig, new: ExperimentConfig,
                keys: Sequence[str] | None = None) -> list[str]:
    """``"key: old -> new"`` for every dotted key (default: all) whose values differ."""
    return [f"{k}: {config_value(old, k)!r} -> {config_value(new, k)!r}"
            for k in (config_keys(old) if keys is None else keys)
            if config_value(old, k) != config_value(new, k)]


def _parse_value(text: str) -> Any:
    """A Python literal (``16``, ``0.5``, ``None``, ``[1, 2]``, ``'x'``), else the bare string."""
    try:
        return ast.literal_eval(text)
    except (ValueError, SyntaxError):
        return text


_TYPES = {"int": (int,), "float": (int, float), "str": (str,), "bool": (bool,),
          "tuple[int, ...]": (tuple,)}


def _field_type(key: str) -> str:
    section, _, name = key.rpartition(".")
    cls = {"data": DataConfig, "model": ModelConfig, "model.moe": MoEConfig, "mesh": MeshConfig,
           "train": TrainConfig}[section]
    return next(f.type for f in dataclasses.fields(cls) if f.name == name)


def _check_type(key: str, value: Any) -> None:
    """Refuses an override whose value does not fit the field's annotation (``"8"`` for an
    int, ``True`` for an int: bool is an int in Python, never in a config)."""
    annotation = str(_field_type(key))
    options = [a.strip() for a in annotation.split("|")]
    if value is None and "None" in options:
        return
    for opt in options:
        types = _TYPES.get(opt, ())
        if isinstance(value, types) and not (isinstance(value, bool) and opt != "bool"):
            return
    raise ValueError(f"config key {key!r} takes {annotation}, got {value!r} "
                     f"({type(value).__name__})")


def apply_overrides(cfg: ExperimentConfig, overrides: Sequence[str]) -> ExperimentConfig:
    """Returns ``cfg`` with ``"section.field=value"`` overrides applied, validated.

    ``value`` is a Python literal (``--set model.moe.num_experts=16``, ``--set
    model.moe_layers=[1,2]``, ``--set model.num_kv_heads=None``); anything else is a string
    (``--set model.dtype=bfloat16``).

    Raises:
      ValueError: a malformed override, an unknown key (the message names the nearest valid
        keys), or a value the config's validation refuses.
    """
    keys = config_keys(cfg)
    updates: dict[str, Any] = {}
    for item in overrides:
        key, sep, text = item.partition("=")
        key = key.strip()
        if not sep or not key:
            raise ValueError(f"override {item!r} must look like section.field=value, e.g. "
                             "model.moe.num_experts=16")
        if key not in keys:
            near = difflib.get_close_matches(key, keys, n=3, cutoff=0.5)
            if not near:  # a right field name under the wrong section
                near = [k for k in keys if k.rsplit(".", 1)[-1] == key.rsplit(".", 1)[-1]]
            hint = f"; did you mean {', '.join(near)}?" if near else ""
            raise ValueError(f"unknown config key {key!r}{hint} (sections: data, model, "
                             "model.moe, mesh, train; every key is listed in configs/small.py)")
        value = _parse_value(text.strip())
        if key == "model.moe_layers" and isinstance(value, list):
            value = tuple(value)
        _check_type(key, value)
        updates[key.replace(".", "__")] = value
    return cfg.replace(**updates) if updates else cfg


def load_config(name: str, overrides: Sequence[str] = ()) -> ExperimentConfig:
    """Loads a named config (``tiny``, ``small``, ``base``: ``configs/<name>.py``, installed as
    ``ec2moe_jax.configs``) or a path to a configs-style ``.py`` file (a ``get_config()``
    returning the nested dict), then applies ``overrides`` (see :func:`apply_overrides`).

    Raises:
      FileNotFoundError: a config path that does not exist.
      ValueError: an unknown config name, an unknown key, or an invalid value.
    """
    if name.endswith(".py") or os.sep in name:
        spec = importlib.util.spec_from_file_location("_ec2moe_config", name)
        if spec is None or spec.loader is None or not os.path.exists(name):
            raise FileNotFoundError(f"config file {name!r} not found")
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        label = os.path.splitext(os.path.basename(name))[0]
    else:
        if name not in NAMED_CONFIGS:
            raise ValueError(f"unknown config {name!r}; expected one of "
                             f"{', '.join(NAMED_CONFIGS)} or a path to a configs-style .py file")
        module = importlib.import_module(f"ec2moe_jax.configs.{name}")
        label = name
    return apply_overrides(from_dict(label, module.get_config()), overrides)
