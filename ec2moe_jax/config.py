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
import math
import os
from collections.abc import Sequence
from typing import Any

DISPATCHES = ("einsum", "gather", "ragged")
NAMED_CONFIGS = ("tiny", "small", "small_fine", "base")
BYTE_VOCAB = 256  # the byte tokenizer's ids 0..255: every corpus here is tokenised as bytes


def _check(cond: bool, msg: str) -> None:
    if not cond:
        raise ValueError(msg)


def _rule(default: Any, **rule: Any) -> Any:
    """A config field whose constraint sits next to it: ``ge``/``gt``/``le``/``lt`` bounds,
    ``choices`` or ``nonempty``. :func:`check_field` reads the rule (and the annotation) for
    the dataclasses and ``--set`` overrides alike, so there is one validation path."""
    return dataclasses.field(default=default, metadata=rule)


# Annotation option -> accepted Python types. bool is an int in Python, never in a config.
_TYPES = {"int": (int,), "float": (int, float), "str": (str,), "bool": (bool,),
          "tuple[int, ...]": (tuple, list)}
_BOUNDS = (("ge", ">=", lambda v, b: v >= b), ("gt", ">", lambda v, b: v > b),
           ("le", "<=", lambda v, b: v <= b), ("lt", "<", lambda v, b: v < b))


def _type_ok(value: Any, opt: str) -> bool:
    if opt == "None":
        return value is None
    if opt in _CLASSES:
        return isinstance(value, _CLASSES[opt])
    if isinstance(value, bool) and opt != "bool":
        return False
    if opt == "tuple[int, ...]":
        return isinstance(value, tuple | list) and all(
            isinstance(v, int) and not isinstance(v, bool) for v in value)
    return isinstance(value, _TYPES.get(opt, ()))


def check_field(cls: type, name: str, value: Any) -> Any:
    """Checks ``value`` for field ``name`` of the config dataclass ``cls``: its type (from the
    annotation: ``32.0`` is not an int, ``"8"`` not a number, ``True`` not an int), finiteness
    (no NaN or infinity in a float) and the field's rule (sign, range, choices).

    Returns:
      the value, normalised (a list for a ``tuple[int, ...]`` field becomes a tuple).

    Raises:
      ValueError: naming the dotted key (``model.norm_eps``), the value and what it must be.
    """
    key = f"{_SECTIONS[cls]}.{name}"
    f = next((f for f in dataclasses.fields(cls) if f.name == name), None)
    _check(f is not None, f"unknown config key {key!r}")
    annotation = str(f.type)
    options = [a.strip() for a in annotation.split("|")]
    if not any(_type_ok(value, opt) for opt in options):
        raise ValueError(f"{key}={value!r} must be {annotation.replace('|', 'or')}, got "
                         f"{type(value).__name__}")
    if value is None:
        return value
    if isinstance(value, float):
        _check(math.isfinite(value), f"{key}={value!r} must be a finite number")
    rule = f.metadata
    if "choices" in rule:
        _check(value in rule["choices"], f"{key}={value!r} must be one of {rule['choices']}")
    if rule.get("nonempty"):
        _check(len(value) > 0, f"{key}={value!r} must not be empty")
    for word, sign, holds in _BOUNDS:
        if word in rule:
            _check(holds(value, rule[word]), f"{key}={value!r} must be {sign} {rule[word]}")
    return tuple(value) if isinstance(value, list) else value


def _check_fields(obj: Any) -> None:
    """Runs :func:`check_field` over every field of a config dataclass (at construction)."""
    for f in dataclasses.fields(obj):
        value = check_field(type(obj), f.name, getattr(obj, f.name))
        if value is not getattr(obj, f.name):
            object.__setattr__(obj, f.name, value)  # frozen: normalise once, here


@dataclasses.dataclass(frozen=True)
class DataConfig:
    # "shakespeare" or a comma-separated list of UTF-8 text files
    source: str = _rule("shakespeare", nonempty=True)
    # where the downloaded corpus and cleaned text live
    cache_dir: str = _rule("~/.cache/ec2moe_jax", nonempty=True)
    val_fraction: float = _rule(0.05, gt=0.0, lt=0.5)  # per work, the slice after training
    test_fraction: float = _rule(0.05, gt=0.0, lt=0.5)  # per work, the last slice

    def __post_init__(self):
        _check_fields(self)

    def validate(self) -> DataConfig:
        return self


@dataclasses.dataclass(frozen=True)
class MoEConfig:
    num_experts: int = _rule(8, ge=1)  # E: routed experts per MoE layer
    top_k: int = _rule(2, ge=1)  # K: experts chosen per token
    expert_dim: int = _rule(512, ge=1)  # F: hidden width of each SwiGLU expert
    # training capacity per expert; None = dropless
    capacity_factor: float | None = _rule(1.25, gt=0.0)
    # capacity when deterministic; None = dropless (a finite value makes KV-cache decoding
    # differ from the full forward: groups differ)
    eval_capacity_factor: float | None = _rule(None, gt=0.0)
    renormalize: bool = True  # renormalise combine weights over the chosen experts (Mixtral)
    aux_loss_coef: float = _rule(0.01, ge=0.0)  # load-balance loss weight (Switch eq. 4)
    z_loss_coef: float = _rule(1e-3, ge=0.0)  # router z-loss weight (ST-MoE eq. 5)
    shared_expert_dim: int = _rule(0, ge=0)  # width of an always-on shared expert; 0 = none
    shared_expert_gate: bool = False  # sigmoid gate on the shared expert (Qwen2-MoE)
    # "einsum" (portable), "gather" (sort/gather), "ragged" (dropless)
    dispatch: str = _rule("einsum", choices=DISPATCHES)
    group_size: int | None = _rule(None, ge=1)  # tokens per routing group; None = a sequence
    router_bias: bool = False  # a learned bias on the router logits (GPT-OSS)
    expert_bias: bool = False  # biases on the expert projections (GPT-OSS)
    # expert activation: "swiglu" (silu(g) * u) or "swiglu_oss" (GPT-OSS: g clamped to
    # <= swiglu_limit, u to +-swiglu_limit, g * sigmoid(swiglu_alpha * g) * (u + 1))
    expert_act: str = _rule("swiglu", choices=("swiglu", "swiglu_oss"))
    swiglu_alpha: float = _rule(1.702, gt=0.0)  # GPT-OSS's sigmoid slope (swiglu_oss only)
    swiglu_limit: float = _rule(7.0, gt=0.0)  # GPT-OSS's clamp (swiglu_oss only)

    def __post_init__(self):
        _check_fields(self)

    def validate(self, expert_shards: int = 1) -> MoEConfig:
        _check(self.dispatch != "ragged" or (self.expert_act == "swiglu"
                                             and not self.expert_bias),
               f"model.moe.dispatch='ragged' runs plain SwiGLU experts without biases, but "
               f"expert_act={self.expert_act!r}, expert_bias={self.expert_bias}; use "
               "dispatch='einsum' or 'gather'")
        _check(not self.expert_bias or self.expert_act == "swiglu_oss",
               "model.moe.expert_bias=True needs expert_act='swiglu_oss' (the biased GPT-OSS "
               "expert); plain SwiGLU experts have no biases")
        _check(
            1 <= self.top_k <= self.num_experts,
            f"{self.top_k=} must lie in [1, num_experts={self.num_experts}]",
        )
        _check(
            self.num_experts % expert_shards == 0,
            f"num_experts={self.num_experts} not divisible by expert_shards={expert_shards}; "
            "choose an expert axis size that divides the number of experts",
        )
        return self


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    vocab_size: int = _rule(256, ge=1)  # V: byte-level tokenizer
    d_model: int = _rule(256, ge=1)  # D
    num_layers: int = _rule(4, ge=1)
    num_heads: int = _rule(4, ge=1)
    num_kv_heads: int | None = _rule(None, ge=1)  # grouped-query attention; None = num_heads
    head_dim: int | None = _rule(None, ge=1)  # None = d_model // num_heads
    d_ff: int = _rule(1024, ge=1)  # hidden width of the dense SwiGLU in non-MoE layers
    moe_layers: tuple[int, ...] | None = None  # which layers are MoE; None = all
    max_seq_len: int = _rule(512, ge=1)  # KV cache length and the longest sequence accepted
    rope_theta: float = _rule(10000.0, gt=0.0)  # RoPE base wavelength
    norm_eps: float = _rule(1e-6, gt=0.0)  # RMSNorm epsilon (0 divides by zero on a zero row)
    tie_embeddings: bool = False
    # "none", "qkv" (Qwen2-MoE) or "all" (q, k, v and output)
    attention_bias: str = _rule("none", choices=("none", "qkv", "all"))
    # RMSNorm on q/k: "none", "head" (per head, Qwen3) or "full" (OLMoE)
    qk_norm: str = _rule("none", choices=("none", "head", "full"))
    # activation dtype; router maths always runs in float32
    dtype: str = _rule("float32", choices=("float32", "bfloat16"))
    # sliding-window attention: a query at position p sees keys (p - W, p]; None = full
    # causal attention (Mixtral, Qwen's use_sliding_window, GPT-OSS's sliding layers)
    sliding_window: int | None = _rule(None, ge=1)
    # the layers that use sliding_window; None = every layer
    sliding_layers: tuple[int, ...] | None = None
    # GraniteMoE's multipliers (1.0 elsewhere): embeddings are scaled by
    # embedding_multiplier, each residual branch by residual_multiplier, logits divided by
    # logits_scaling; attention_multiplier replaces head_dim**-0.5 (None keeps it)
    # RoPE scaling: "none" or "yarn" (Peng et al. 2023, "YaRN", as transformers computes
    # it: rope_factor, rope_original_max_len, rope_beta_fast/slow, rope_truncate)
    rope_scaling: str = _rule("none", choices=("none", "yarn"))
    rope_factor: float = _rule(1.0, ge=1.0)
    rope_original_max_len: int | None = _rule(None, ge=1)
    rope_beta_fast: float = _rule(32.0, gt=0.0)
    rope_beta_slow: float = _rule(1.0, gt=0.0)
    rope_truncate: bool = True
    attention_sinks: bool = False  # a learned per-head logit in each softmax (GPT-OSS)
    embedding_multiplier: float = _rule(1.0, gt=0.0)
    residual_multiplier: float = _rule(1.0, gt=0.0)
    attention_multiplier: float | None = _rule(None, gt=0.0)
    logits_scaling: float = _rule(1.0, gt=0.0)
    moe: MoEConfig = dataclasses.field(default_factory=MoEConfig)

    def __post_init__(self):
        _check_fields(self)

    @property
    def kv_heads(self) -> int:
        return self.num_kv_heads or self.num_heads

    @property
    def dim_per_head(self) -> int:
        return self.head_dim or self.d_model // self.num_heads

    def is_moe_layer(self, i: int) -> bool:
        return self.moe_layers is None or i in self.moe_layers

    def window(self, i: int) -> int | None:
        """The attention window of layer ``i`` (None: full causal attention)."""
        if self.sliding_layers is not None and i not in self.sliding_layers:
            return None
        return self.sliding_window

    def validate(self, expert_shards: int = 1) -> ModelConfig:
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
        if self.sliding_layers is not None:
            bad = [i for i in self.sliding_layers if not 0 <= i < self.num_layers]
            _check(not bad, f"model.sliding_layers {bad} outside [0, num_layers="
                            f"{self.num_layers})")
        self.moe.validate(expert_shards)
        return self


@dataclasses.dataclass(frozen=True)
class MeshConfig:
    train_expert_shards: int = _rule(1, ge=1)  # size of the 'expert' axis of the training mesh
    end_devices: int = _rule(2, ge=1)  # devices of the end submesh (taken first)
    cloud_devices: int = _rule(6, ge=1)  # devices of the cloud submesh (taken next)
    # size of the cloud's 'expert' axis; the rest is 'data'
    cloud_expert_shards: int = _rule(2, ge=1)

    def __post_init__(self):
        _check_fields(self)

    def validate(self) -> MeshConfig:
        _check(
            self.cloud_devices % self.cloud_expert_shards == 0,
            f"cloud_devices={self.cloud_devices} not divisible by "
            f"cloud_expert_shards={self.cloud_expert_shards}",
        )
        return self


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    batch_size: int = _rule(16, ge=1)  # B: sequences per step (global)
    seq_len: int = _rule(128, ge=1)  # T: tokens per training sequence
    steps: int = _rule(2000, ge=1)  # total optimiser steps (the cosine schedule spans them)
    # steps the schedule spans; None = steps. Set when a finished run is extended: the extra
    # steps train on at the final learning rate
    schedule_steps: int | None = _rule(None, ge=1)
    learning_rate: float = _rule(3e-3, gt=0.0)  # peak learning rate
    warmup_steps: int = _rule(100, ge=0)  # linear warmup from 0 to the peak
    min_lr_ratio: float = _rule(0.1, ge=0.0, le=1.0)  # final learning rate / the peak
    weight_decay: float = _rule(0.1, ge=0.0)  # AdamW decoupled weight decay
    b1: float = _rule(0.9, ge=0.0, lt=1.0)  # Adam first-moment decay
    b2: float = _rule(0.95, ge=0.0, lt=1.0)  # Adam second-moment decay
    clip_norm: float = _rule(1.0, gt=0.0)  # global gradient-norm clipping
    seed: int = _rule(0, ge=0)  # parameter init and data order
    eval_every: int = _rule(250, ge=1)  # steps between held-out evaluations
    eval_batches: int = _rule(16, ge=1)  # validation batches per periodic evaluation
    # sliding-window eval: scored bytes see >= T - stride bytes of context; None =
    # non-overlapping windows (the first bytes of each see little)
    eval_stride: int | None = _rule(None, ge=1)
    checkpoint_every: int = _rule(250, ge=1)  # steps between orbax checkpoints
    keep_checkpoints: int = _rule(2, ge=1)  # how many checkpoints to keep
    log_every: int = _rule(25, ge=1)  # steps between JSON-lines metric records
    # residency-aware pre-training (ours): the share of steps that route the leading layers
    # over a random expert subset (training.residency.step_residency), so an end device
    # holding any subset degrades gracefully; 0 = off (every step sees every expert)
    residency_prob: float = _rule(0.0, ge=0.0, le=1.0)
    # how many leading MoE layers such a step may mask (1..this many, drawn per step); None:
    # all of them
    residency_layers: int | None = _rule(None, ge=1)

    def __post_init__(self):
        _check_fields(self)

    def validate(self) -> TrainConfig:
        _check(self.warmup_steps < self.steps, f"{self.warmup_steps=} must be < {self.steps=}")
        _check(self.schedule_steps is None or self.warmup_steps < self.schedule_steps,
               f"train.schedule_steps={self.schedule_steps} must be > warmup_steps="
               f"{self.warmup_steps} (or None: the schedule spans train.steps)")
        _check(
            self.eval_stride is None or self.eval_stride <= self.seq_len,
            f"train.eval_stride={self.eval_stride} must lie in [1, seq_len={self.seq_len}]",
        )
        return self


_SECTIONS = {DataConfig: "data", MoEConfig: "model.moe", ModelConfig: "model",
             MeshConfig: "mesh", TrainConfig: "train"}
_CLASSES = {cls.__name__: cls for cls in _SECTIONS}


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
        t, m = self.train, self.model
        if t.residency_prob > 0:
            _check(m.moe.num_experts > m.moe.top_k,
                   f"train.residency_prob={t.residency_prob} needs model.moe.num_experts="
                   f"{m.moe.num_experts} > top_k={m.moe.top_k} (a subset must drop an expert)")
            moe = sum(m.is_moe_layer(i) for i in range(m.num_layers))
            _check(t.residency_layers is None or t.residency_layers <= moe,
                   f"train.residency_layers={t.residency_layers} exceeds the model's {moe} "
                   "MoE layers (model.moe_layers)")
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


def require_byte_vocab(cfg: ModelConfig, what: str) -> None:
    """Refuses byte-tokenised input (training text, a ``--prompt``) for a model whose
    vocabulary cannot hold every byte: an id >= ``vocab_size`` would index past the
    embedding, which JAX clamps silently instead of failing. (Imported models with their own,
    smaller vocabulary are valid; they take token ids, not text.)

    Raises:
      ValueError: ``cfg.vocab_size`` < 256, naming ``what`` needed the bytes.
    """
    _check(cfg.vocab_size >= BYTE_VOCAB,
           f"model.vocab_size={cfg.vocab_size} is below the byte tokenizer's {BYTE_VOCAB} ids, "
           f"which {what} uses; set model.vocab_size >= {BYTE_VOCAB}")


def _build(cls: type, values: Any, where: str) -> Any:
    _check(isinstance(values, dict), f"config section {where!r} must be a mapping of field "
           f"names to values, got {type(values).__name__}")
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(str(k) for k in set(values) - known)
    _check(not unknown, f"unknown field(s) {unknown} in config section {where!r}; known: "
           f"{sorted(known)}")
    return cls(**values)


def from_dict(name: str, d: Any, source: str | None = None) -> ExperimentConfig:
    """Converts a nested dict (the shape of ``configs/*.py``) into a validated config.

    Args:
      name: the config's label.
      d: ``{"data": {...}, "model": {..., "moe": {...}}, "mesh": {...}, "train": {...}}``;
        missing sections and fields take their defaults.
      source: the file ``d`` came from, named in error messages.

    Raises:
      ValueError: a section that is not a mapping, an unknown field, or a value of the wrong
        type, sign or range (the message names the file, the field and the value).
    """
    try:
        _check(isinstance(d, dict), f"a config must be a mapping of sections, got "
               f"{type(d).__name__}")
        unknown = sorted(str(k) for k in set(d) - {"data", "model", "mesh", "train"})
        _check(not unknown, f"unknown config section(s) {unknown}; known: data, model, mesh, "
               "train")
        model = d.get("model", {})
        _check(isinstance(model, dict), "config section 'model' must be a mapping of field "
               f"names to values, got {type(model).__name__}")
        model = dict(model)
        moe = _build(MoEConfig, model.pop("moe", {}), "model.moe")
        return ExperimentConfig(
            name=name,
            data=_build(DataConfig, d.get("data", {}), "data"),
            model=_build(ModelConfig, {**model, "moe": moe}, "model"),
            mesh=_build(MeshConfig, d.get("mesh", {}), "mesh"),
            train=_build(TrainConfig, d.get("train", {}), "train"),
        ).validate()
    except ValueError as e:
        if source is None:
            raise
        raise ValueError(f"config {source!r}: {e}") from None


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
    except (ValueError, TypeError, SyntaxError, MemoryError, RecursionError):
        return text  # not a literal ("{[]: 1}" raises TypeError): the bare string


def _field_class(key: str) -> tuple[type, str]:
    section, _, name = key.rpartition(".")
    cls = {v: k for k, v in _SECTIONS.items()}[section]
    return cls, name


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
        value = check_field(*_field_class(key), _parse_value(text.strip()))
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
        try:
            spec.loader.exec_module(module)
        except SyntaxError as e:
            raise ValueError(f"config file {name!r} is not valid Python (line {e.lineno}: "
                             f"{e.msg})") from None
        if not callable(getattr(module, "get_config", None)):
            raise ValueError(f"config file {name!r} must define get_config() returning the "
                             "nested dict (see configs/small.py)")
        label = os.path.splitext(os.path.basename(name))[0]
    else:
        if name not in NAMED_CONFIGS:
            raise ValueError(f"unknown config {name!r}; expected one of "
                             f"{', '.join(NAMED_CONFIGS)} or a path to a configs-style .py file")
        module = importlib.import_module(f"ec2moe_jax.configs.{name}")
        label = name
    source = name if label != name else f"configs/{name}.py"
    return apply_overrides(from_dict(label, module.get_config(), source), overrides)
