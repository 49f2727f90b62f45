"""Benchmark: decoding speed, ours against transformers on the same checkpoints, and this
code's decode path against an earlier commit's.

Method (measured on this CPU, one process per implementation family):

* **Ours vs transformers.** Random checkpoints are built by transformers
  (``AutoModelForCausalLM.from_config``, fp32, seeded), saved with ``save_pretrained`` and
  loaded by :func:`ec2moe_jax.load_hf`: an OLMoE-shaped one (d=512, 4 layers, 16 experts
  top-4, vocab 4096, expert width ``olmoe_ffn``) declaring 2,048 positions, the same weights
  declaring 262,144, and a Qwen3-MoE-shaped one (d=512, 4 layers, 128 experts top-8, GQA
  8/2 heads, qk-norm, expert width 192, 262,144 positions). Greedy decoding of 64 new
  tokens after a 32-token random prompt at batch 1 and 8: ours is
  :func:`ec2moe_jax.models.generate` (whole loop on the device; one-row products in the
  threaded CPU kernel of :mod:`ec2moe_jax.kernels`, recorded as ``cpu_matvec_kernel``), theirs is
  ``model.generate(do_sample=False)`` under ``torch.inference_mode`` with no EOS. The new
  tokens of both are compared. Each case runs once to compile/warm up, then ``repeats``
  rounds time every case and implementation in turn (interleaved, so load drifts hit all
  alike); figures are medians of the rounds; tokens/s = B * 64 / seconds (prefill included).
* **Before/after.** The small config (random parameters) in two worker processes, one
  importing this tree and one a ``git worktree`` of ``before_commit`` (the code before the
  fast decode path): the wall time of ``models.generate`` (32-token prompt, 64 new tokens)
  and the split pipeline's decode step (``pipeline.generate`` at split 2, fp32 link, its
  per-stage medians end_step + hop + cloud_step), interleaved round by round.
* **bf16 cost.** The small config trained for ``quality_steps`` steps on the Shakespeare
  corpus; bits/char of the first ``quality_batches`` test batches with fp32 and with bfloat16
  weights (routers kept fp32) and activations: the activations a bf16 KV cache stores.

Needs torch and transformers (not project dependencies): see :data:`TORCH_INSTALL`.
"""

from __future__ import annotations

import dataclasses
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time

import jax
import numpy as np

from ec2moe_jax import kernels

TORCH_INSTALL = ("pip install torch==2.13.0 && pip install transformers  (torch first: it is "
                 "a CPU wheel; transformers first would pull a multi-GB CUDA torch)")
BEFORE_COMMIT = "545e622"
PROMPT_LEN, NEW_TOKENS = 32, 64


def _need_torch():
    try:
        import torch
        import transformers
    except ImportError as e:
        raise RuntimeError(f"the decode benchmark compares against transformers, which is not "
                           f"installed ({e}); install it with: {TORCH_INSTALL}") from e
    return torch, transformers


def make_checkpoints(root: str, *, olmoe_ffn: int = 256, seed: int = 0) -> dict[str, str]:
    """Builds the random checkpoints under ``root``; returns {case name: folder}."""
    torch, tf = _need_torch()
    common = dict(vocab_size=4096, hidden_size=512, num_hidden_layers=4, rms_norm_eps=1e-6,
                  initializer_range=0.1, tie_word_embeddings=False, bos_token_id=None,
                  eos_token_id=None, pad_token_id=0)
    configs = {
        "olmoe-2k": tf.OlmoeConfig(**common, num_attention_heads=8, num_key_value_heads=8,
                                   intermediate_size=olmoe_ffn, num_experts=16,
                                   num_experts_per_tok=4, norm_topk_prob=False,
                                   max_position_embeddings=2048, rope_theta=10000.0),
        "qwen3-moe-256k": tf.Qwen3MoeConfig(
            **common, num_attention_heads=8, num_key_value_heads=2, head_dim=64,
            intermediate_size=1536, moe_intermediate_size=192, num_experts=128,
            num_experts_per_tok=8, norm_topk_prob=True, decoder_sparse_step=1,
            mlp_only_layers=[], max_position_embeddings=262144, rope_theta=1e6),
    }
    folders = {}
    for name, cfg in configs.items():
        torch.manual_seed(seed)
        model = tf.AutoModelForCausalLM.from_config(cfg).float().eval()
        folders[name] = os.path.join(root, name)
        model.save_pretrained(folders[name], safe_serialization=True)
    # The same weights declaring 262,144 positions (as Qwen3-30B-A3B-2507 does).
    folders["olmoe-256k"] = os.path.join(root, "olmoe-256k")
    shutil.copytree(folders["olmoe-2k"], folders["olmoe-256k"])
    path = os.path.join(folders["olmoe-256k"], "config.json")
    with open(path) as f:
        cfg = json.load(f)
    cfg["max_position_embeddings"] = 262144
    with open(path, "w") as f:
        json.dump(cfg, f)
    return {k: folders[k] for k in ("olmoe-2k", "olmoe-256k", "qwen3-moe-256k")}


def _ours(folder: str, bf16: bool = False):
    from ec2moe_jax.models import MoELM, cast_params, generate, load_hf, unstack_experts

    model, params = load_hf(folder)
    if bf16:
        model = MoELM(dataclasses.replace(model.cfg, dtype="bfloat16"))
        params = cast_params(params, "bfloat16")
    params = unstack_experts(params)  # once, as a server or `ec2moe generate` does

    def run(prompt):
        return np.asarray(generate(model, params, prompt, NEW_TOKENS))

    return run, model.cfg


def _theirs(folder: str):
    torch, tf = _need_torch()
    model = tf.AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    model.generation_config.eos_token_id = None  # never stop early: 64 tokens each
    model.generation_config.pad_token_id = 0

    def run(prompt):
        ids = torch.from_numpy(prompt.astype(np.int64))
        with torch.inference_mode():
            out = model.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False,
                                 max_new_tokens=NEW_TOKENS, min_new_tokens=NEW_TOKENS)
        return out[:, prompt.shape[1]:].numpy().astype(np.int32)

    return run


def weight_read_floor(cfg, repeats: int = 30) -> dict:
    """The time a batch-1 decode step cannot beat on this machine: the bytes of weights it
    must read (every layer's attention, norms, router and shared expert, top-k routed experts
    per MoE layer, the LM head; :func:`ec2moe_jax.models.costs.model_costs`), and the measured
    time to stream that many bytes once (a jitted sum over a float32 array of that size,
    median of ``repeats`` after a warm-up; the array is in memory, as the weights are). Any
    implementation, ours or transformers', reads at least these bytes per token.

    Returns:
      ``{"bytes_per_token", "stream_ms", "stream_gb_per_s"}``.
    """
    import jax.numpy as jnp

    from ec2moe_jax.models.costs import model_costs

    c = model_costs(cfg)
    nbytes = float(c.fixed_bytes.sum() + c.is_moe.sum() * c.top_k * c.expert_bytes
                   + c.head_bytes)
    buf = jnp.ones((int(nbytes // 4),), jnp.float32)
    total = jax.jit(jnp.sum)
    total(buf).block_until_ready()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        total(buf).block_until_ready()
        times.append(time.perf_counter() - t0)
    ms = 1e3 * float(np.median(times))
    return {"bytes_per_token": nbytes, "stream_ms": ms, "stream_gb_per_s": nbytes / ms / 1e6}


def _timed(fn, *args):
    t0 = time.perf_counter()
    out = fn(*args)
    return out, time.perf_counter() - t0


def _agreement(a: np.ndarray, b: np.ndarray) -> dict:
    """Identical tokens, and where rows first differ (greedy: a near-tie can flip)."""
    first = [int(np.argmax(ra != rb)) if np.any(ra != rb) else None
             for ra, rb in zip(a, b, strict=True)]
    return {"identical": bool(np.array_equal(a, b)), "first_difference_per_row": first,
            "matching_fraction": float(np.mean(a == b))}


def run_hf(folders: dict[str, str], *, batches=(1, 8), repeats: int = 5,
           bf16_case: str | None = "olmoe-2k", seed: int = 0) -> dict:
    """Ours vs transformers on every checkpoint and batch, interleaved; see the module."""
    import torch

    impls, floors = {}, {}
    for name, folder in folders.items():
        impls[(name, "ours")], cfg = _ours(folder)
        floors[name] = weight_read_floor(cfg)
        impls[(name, "transformers")] = _theirs(folder)
        if name == bf16_case:
            impls[(name, "ours_bf16")], _ = _ours(folder, bf16=True)
    gen = np.random.default_rng(seed)
    prompts = {b: gen.integers(0, 4096, size=(b, PROMPT_LEN)).astype(np.int32)
               for b in batches}
    cases = [(name, impl, b) for (name, impl) in impls for b in batches]
    tokens, times = {}, {c: [] for c in cases}
    for c in cases:  # compile, warm up, keep the tokens
        tokens[c] = impls[c[:2]](prompts[c[2]])
    for _ in range(repeats):
        for c in cases:
            _, dt = _timed(impls[c[:2]], prompts[c[2]])
            times[c].append(dt)
    out = {}
    for name in folders:
        for b in batches:
            row = {}
            for impl in ("ours", "transformers", "ours_bf16"):
                if (name, impl, b) not in times:
                    continue
                s = float(np.median(times[(name, impl, b)]))
                row[impl] = {"median_seconds": s, "tokens_per_s": b * NEW_TOKENS / s,
                             "ms_per_token_step": 1e3 * s / NEW_TOKENS,
                             "seconds_each_round": times[(name, impl, b)]}
            row["speedup_vs_transformers"] = (row["ours"]["tokens_per_s"]
                                              / row["transformers"]["tokens_per_s"])
            if b == 1:  # what the weights alone cost per token (weight_read_floor)
                f = floors[name]
                row["weight_read_floor"] = {
                    **f, "max_speedup_vs_transformers": (
                        row["transformers"]["ms_per_token_step"] / f["stream_ms"])}
            row["tokens_ours_vs_transformers"] = _agreement(
                tokens[(name, "ours", b)], tokens[(name, "transformers", b)])
            if "ours_bf16" in row:
                row["tokens_bf16_vs_fp32"] = _agreement(tokens[(name, "ours_bf16", b)],
                                                       tokens[(name, "ours", b)])
            out[f"{name}/batch{b}"] = row
    out["torch"] = {"version": torch.__version__, "threads": torch.get_num_threads()}
    return out


_WORKER = r"""
import json, sys, time
sys.path.insert(0, sys.argv[1])
import jax, numpy as np
import ec2moe_jax
assert ec2moe_jax.__file__.startswith(sys.argv[1]), ec2moe_jax.__file__
from ec2moe_jax.config import load_config
from ec2moe_jax.models import MoELM, generate, init_params
from ec2moe_jax.pipeline import Channel, build_stages
from ec2moe_jax.pipeline import generate as pipeline_generate
from ec2moe_jax.profiles import LinkProfile
from ec2moe_jax.sharding import split_end_cloud, unbox

cfg = load_config("small")
model = MoELM(cfg.model)
params = unbox(init_params(model, jax.random.key(0)))
end, cloud = split_end_cloud(cfg.mesh, jax.devices())
stages = build_stages(model, params, end, cloud, split=2)
link = LinkProfile("bench", bandwidth_bps=1e9, rtt_s=0.0)
print(json.dumps({"ready": ec2moe_jax.__file__}), flush=True)
for line in sys.stdin:
    kind, b = line.split()
    prompt = np.random.default_rng(int(b)).integers(0, 256, (int(b), 32)).astype(np.int32)
    t0 = time.perf_counter()
    if kind == "generate":
        out = np.asarray(generate(model, params, prompt, 64))
        rec = {"seconds": time.perf_counter() - t0}
    else:
        out, rep = pipeline_generate(stages, prompt, 64, channel=Channel.from_profile(link),
                                     micro_batch=int(b))
        med = {k: float(np.median(v)) for k, v in rep.stage_seconds.items()}
        rec = {"seconds": med["end_step"] + med["hop"] + med["cloud_step"], "stages": med}
    rec["tokens"] = np.asarray(out).tolist()
    print(json.dumps(rec), flush=True)
"""


class _Worker:
    """A long-lived worker process importing ``ec2moe_jax`` from ``root``."""

    def __init__(self, root: str):
        env = {**os.environ, "JAX_NUM_CPU_DEVICES": "8", "JAX_PLATFORMS": "cpu"}
        self.proc = subprocess.Popen([sys.executable, "-c", _WORKER, root], env=env, text=True,
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE)
        self.ready = self._read()

    def _read(self) -> dict:
        line = self.proc.stdout.readline()
        if not line:
            raise RuntimeError(f"the benchmark worker for {self.proc.args[-1]!r} exited "
                               f"(code {self.proc.wait()}); its stderr says why")
        return json.loads(line)

    def ask(self, kind: str, batch: int) -> dict:
        self.proc.stdin.write(f"{kind} {batch}\n")
        self.proc.stdin.flush()
        return self._read()

    def close(self) -> None:
        self.proc.stdin.close()
        self.proc.wait()


def run_before_after(repo: str, *, before_commit: str = BEFORE_COMMIT, repeats: int = 5,
                     jobs=(("generate", 1), ("generate", 8), ("split_step", 1))) -> dict:
    """The small model's generate and the split decode step, this tree vs ``before_commit``
    (checked out into a temporary git worktree), interleaved; see the module docstring."""
    tmp = tempfile.mkdtemp(prefix="ec2moe-before-")
    old = os.path.join(tmp, "tree")
    subprocess.run(["git", "-C", repo, "worktree", "add", "--detach", old, before_commit],
                   check=True, capture_output=True)
    workers = {}
    try:
        workers = {"before": _Worker(old), "after": _Worker(repo)}
        recs = {(w, j): [] for w in workers for j in jobs}
        for w in workers.values():  # compile and warm up
            for kind, b in jobs:
                w.ask(kind, b)
        for _ in range(repeats):
            for kind, b in jobs:
                for name, w in workers.items():
                    recs[(name, (kind, b))].append(w.ask(kind, b))
    finally:
        for w in workers.values():
            w.close()
        subprocess.run(["git", "-C", repo, "worktree", "remove", "--force", old],
                       capture_output=True)
        shutil.rmtree(tmp, ignore_errors=True)
    out = {"before_commit": before_commit}
    for kind, b in jobs:
        row = {}
        for name in workers:
            s = float(np.median([r["seconds"] for r in recs[(name, (kind, b))]]))
            row[name] = {"median_seconds": s, "seconds_each_round":
                         [r["seconds"] for r in recs[(name, (kind, b))]]}
            if kind == "generate":
                row[name]["tokens_per_s"] = b * NEW_TOKENS / s
        row["speedup"] = row["before"]["median_seconds"] / row["after"]["median_seconds"]
        row["same_tokens"] = (recs[("before", (kind, b))][0]["tokens"]
                              == recs[("after", (kind, b))][0]["tokens"])
        out[f"{kind}/batch{b}"] = row
    return out


def run_bf16_quality(workdir: str, *, steps: int = 400, batches: int = 16) -> dict:
    """Trains the small config for ``steps`` in ``workdir`` (resumed if there), then
    bits/char on the first ``batches`` test batches in fp32 and in bf16."""
    from ec2moe_jax.config import load_config
    from ec2moe_jax.data import prepare_splits
    from ec2moe_jax.models import cast_params
    from ec2moe_jax.training.loop import build, evaluate, load_params, train

    cfg = load_config("small", [f"train.steps={steps}"])
    splits = prepare_splits(cfg.data)
    t0 = time.perf_counter()
    train(cfg, workdir, splits=splits, progress=False, final_eval_batches=batches)
    trained_s = time.perf_counter() - t0
    setup, params = load_params(workdir)
    fp32 = evaluate(setup, params, splits.test, batches)
    bf16_setup = build(setup.cfg.replace(model__dtype="bfloat16"), setup.mesh)
    bf16 = evaluate(bf16_setup, cast_params(params, "bfloat16"), splits.test, batches)
    return {"config": "small", "train_steps": steps, "train_seconds_this_run": trained_s,
            "eval": f"first {batches} test batches of {cfg.train.batch_size} x "
                    f"{cfg.train.seq_len} bytes",
            "bits_per_char_fp32": fp32, "bits_per_char_bf16": bf16,
            "bf16_cost_bits_per_char": bf16 - fp32}


def run(*, repo: str, olmoe_ffn: int = 256, repeats: int = 5, batches=(1, 8),
        quality_workdir: str | None = None, quality_steps: int = 400,
        before_after: bool = True) -> dict:
    """The whole benchmark; returns the JSON-ready record (see the module docstring)."""
    record = {
        "benchmark": "decode",
        "method": ("measured on this CPU: " + _device() + "; greedy, prompt "
                   f"{PROMPT_LEN} tokens, {NEW_TOKENS} new tokens; medians of {repeats} "
                   "interleaved rounds after a warm-up run; tokens/s = batch * new tokens / "
                   "wall seconds of the whole request (prefill included)"),
        # Ours runs one-row float32 products in ec2moe_jax.kernels' threaded matvec where it
        # could be built (False: XLA's matmul, as before it existed).
        "cpu_matvec_kernel": kernels.available(),
        "shapes": {"olmoe": f"d=512, 4 layers, 8 heads, 16 experts top-4, expert width "
                            f"{olmoe_ffn}, vocab 4096, fp32",
                   "qwen3_moe": "d=512, 4 layers, 8/2 heads (head_dim 64), 128 experts top-8, "
                                "expert width 192, qk-norm, vocab 4096, fp32"},
        "torch_install": TORCH_INSTALL,
        # This machine may be shared: the 1/5/15-minute load averages (2 cores) around the run.
        "load_average_start": list(os.getloadavg()),
    }
    with tempfile.TemporaryDirectory(prefix="ec2moe-decode-") as root:
        record["hf"] = run_hf(make_checkpoints(root, olmoe_ffn=olmoe_ffn), batches=batches,
                              repeats=repeats)
    for b in batches:
        a, z = (record["hf"][f"olmoe-{k}/batch{b}"]["ours"]["median_seconds"]
                for k in ("2k", "256k"))
        record.setdefault("max_positions_2048_vs_262144", {})[f"batch{b}"] = {
            "ours_ratio_256k_over_2k": z / a}
    if before_after:
        record["before_after"] = run_before_after(repo, repeats=repeats)
    record["load_average_end"] = list(os.getloadavg())
    if quality_workdir:
        record["bf16_quality"] = run_bf16_quality(quality_workdir, steps=quality_steps)
    return record


def _device() -> str:
    return (f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, "
            f"jax {jax.__version__}")
