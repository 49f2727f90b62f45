"""From a plan to runnable stages: the routing mask, the link codec (trained if one exists
for the plan's split/rank/bits, else PCA-initialised on real activations), warm-up.

Shape legend: M MoE layers, E experts, N requests, T time.
"""

from __future__ import annotations

import hashlib
import os

import numpy as np
from jax.sharding import Mesh

from ec2moe_jax.codec import lowrank
from ec2moe_jax.layers import QuantSpec, quantize_experts
from ec2moe_jax.models import MoELM
from ec2moe_jax.pipeline import executor
from ec2moe_jax.pipeline.link import Channel
from ec2moe_jax.pipeline.plans import PipelinePlan
from ec2moe_jax.pipeline.stages import Stages, build_stages


def link_codec(model: MoELM, params, plan: PipelinePlan, *, workdir: str | None,
               train_tokens: np.ndarray | None) -> tuple[dict | None, str]:
    """Codec weights for ``plan`` and where they come from."""
    from ec2moe_jax.training.codec import collect_hidden, default_codec_dir, load_codec

    transport = plan.spec.check(model.cfg.d_model)
    if not transport.lowrank or plan.split in (0, model.cfg.num_layers):
        return None, "no codec"
    bits = transport.quant_bits
    d = model.cfg.d_model
    path = default_codec_dir(workdir, plan.split, transport.rank, bits) if workdir else None
    if path and os.path.isdir(path):
        return load_codec(path, d, transport.rank), f"fine-tuned ({path})"
    if train_tokens is None:
        raise ValueError(f"plan {plan.name!r} needs a {plan.codec} codec at split "
                         f"{plan.split}; none is saved and no training text was given for PCA")
    hidden = collect_hidden(model, params, train_tokens, plan.split, batches=4, batch_size=8,
                            seq_len=min(128, model.cfg.max_seq_len))
    codec = lowrank.pca_init(hidden, transport.rank)
    codec.pop("explained")
    return codec, "PCA-initialised on 4x8x128 training tokens (not fine-tuned)"


def group_gates(model: MoELM, params, allowed: np.ndarray, split: int,
                frequencies: np.ndarray, *, workdir: str | None,
                train_tokens: np.ndarray | None, steps: int = 0,
                use_gate: bool = True, init_only: bool = False, experts: str = "bf16"
                ) -> tuple[tuple | None, str]:
    """HL-GGN gates for the end layers of a plan that drops experts: loaded from
    ``<workdir>/gates/mask-<hash of the mask>`` if trained before, else trained for ``steps``
    (LM frozen) and saved there, else None (the router, i.e. plain masked top-k).
    ``use_gate=False`` always gives the router, even when a gate is saved for the mask (the
    masked top-k ablation); ``init_only=True`` always gives the gate as initialised by
    least-squares distillation of the router on real activations (no training, nothing
    loaded or saved: seconds instead of minutes per mask). ``experts``: the end's expert
    format (``params`` already in it); a gate is saved per mask and format."""
    from ec2moe_jax.training import gate as gate_lib

    if split == 0 or allowed[:split].all():
        return None, "router (every expert reachable)"
    if not use_gate:
        return None, "router (masked top-k, gate disabled)"
    key = hashlib.sha1(np.packbits(allowed[:split]).tobytes()).hexdigest()[:12]
    key += "" if experts == "bf16" else f"-{experts}"
    path = os.path.join(workdir, "gates", f"mask-{key}") if workdir else None
    if train_tokens is None or not ((path and os.path.isdir(path)) or steps > 0 or init_only):
        return None, "router (masked top-k: no trained group gate for this mask)"
    seq_len = min(128, model.cfg.max_seq_len)
    spec, gates = gate_lib.init_gates(model, params, (allowed, split), frequencies,
                                      train_tokens, seq_len=seq_len)
    if init_only:
        return (spec, gates), "group gate (least-squares init, not trained)"
    if path and os.path.isdir(path):
        return (spec, gate_lib.load_gates(path, gates)), f"group gate ({path})"
    gates, _ = gate_lib.train_gates(model, params, spec, gates, train_tokens, steps=steps,
                                    seq_len=seq_len, checkpoint_dir=path, progress=False)
    return (spec, gates), f"group gate trained here ({steps} steps, LM frozen)"


def prepare(model: MoELM, params, plan: PipelinePlan, end_mesh: Mesh,
            cloud_mesh: Mesh | None, *,
            frequencies: np.ndarray, workdir: str | None = None,
            train_tokens: np.ndarray | None = None, temperature: float = 0.0,
            gate_steps: int = 0, use_gate: bool = True, gate_init_only: bool = False,
            side: str = "both") -> tuple[Stages, dict]:
    """Stages of ``plan`` and a JSON-ready description (mask coverage, codec and gate
    sources). End layers of a plan that drops experts use the HL-GGN group gate when one is
    saved for its mask (or ``gate_steps > 0`` trains one), else masked top-k; ``use_gate=False``
    forces masked top-k, ``gate_init_only=True`` the least-squares-initialised gate.
    ``side="end"`` builds the end side alone (an end client process; ``cloud_mesh`` may be
    None), see :func:`~.stages.build_stages`."""
    cfg = model.cfg
    plan.validate(cfg)
    allowed = plan.allowed(frequencies, cfg)
    experts = QuantSpec.parse(plan.experts)
    # Quantised once: the stages take it (only the end's layers changed), and a gate or a PCA
    # codec made here sees the hidden states of the end it runs. A codec fine-tuned and saved
    # for this split is loaded as it is, whatever the end's expert format.
    end_params = (quantize_experts(params, experts, range(plan.split)) if experts.bits < 16
                  else params)
    codec, source = link_codec(model, end_params, plan, workdir=workdir,
                               train_tokens=train_tokens)
    gates, gate_source = group_gates(model, end_params, allowed, plan.split, frequencies,
                                     workdir=workdir, train_tokens=train_tokens,
                                     steps=gate_steps, use_gate=use_gate,
                                     init_only=gate_init_only, experts=experts.name)
    stages = build_stages(model, end_params, end_mesh, cloud_mesh, split=plan.split,
                          transport=plan.spec, allowed=allowed, codec=codec,
                          gates=gates, temperature=temperature, side=side)
    moe = [i for i in range(plan.split) if cfg.is_moe_layer(i)]
    freq = np.asarray(frequencies, np.float64)
    freq = freq / freq.sum(-1, keepdims=True)
    rows = [sum(cfg.is_moe_layer(j) for j in range(i)) for i in moe]
    covered = [float(freq[r][allowed[i]].sum()) for r, i in zip(rows, moe, strict=True)]
    info = {**plan.to_json(), "codec_source": source, "gate": gate_source,
            "routing_mass_covered_per_end_layer": covered}
    return stages, info


def warm_up(stages: Stages, *, prompts: np.ndarray | None = None,
            texts: np.ndarray | None = None, micro_batch: int = 1, link=None,
            new_tokens: int = 2) -> None:
    """Compiles every stage at the shapes a run will use (untimed), so measured stage
    times exclude compilation: one generation of ``new_tokens`` tokens (pass the run's
    count when its prompt + tokens fall in another KV cache bucket:
    :func:`~ec2moe_jax.models.generate.request_cache_length`), one scoring pass."""
    from ec2moe_jax.profiles import link as link_preset

    profile = link or link_preset("wifi")
    if prompts is not None:
        executor.generate(stages, prompts, new_tokens, channel=Channel.from_profile(profile),
                          micro_batch=micro_batch)
    if texts is not None:
        executor.score(stages, texts, channel=Channel.from_profile(profile),
                       micro_batch=micro_batch)
