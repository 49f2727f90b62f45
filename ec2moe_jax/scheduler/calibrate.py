"""Calibration of the stage-time model on the machine at hand.

Times the small model's stages (the whole stack, the first half, single layers, the LM head)
at several token counts with ``jax.block_until_ready`` (warm-up calls, then the median of
repeats timed round-robin over the stages: the CPU may be shared), then fits the scheduler's
:func:`~ec2moe_jax.scheduler.model.stage_time`, ``time = overhead + layers * layer_overhead +
FLOPs / (eta_f F) + bytes / (eta_b BW)``, jointly over its four coefficients
(:func:`fit_stage_model`), where F and BW are this machine's live matmul FLOP/s and copy
bandwidth (:func:`ec2moe_jax.profiles.measure`). The per-call overhead (dispatch latency)
dominates tiny stages such as the head on CPU, so the fit sees stages of very different sizes.
Held out for validation: one whole stage kind (the first half of the stack, a size the fit
never saw) and one token count for every stage. Presets are then scaled by the same
efficiencies (an assumption for devices we do not have).
"""

from __future__ import annotations

import time

import jax
import jax.numpy as jnp
import numpy as np

from ec2moe_jax.config import ModelConfig
from ec2moe_jax.models.costs import model_costs
from ec2moe_jax.models.lm import MoELM, init_params
from ec2moe_jax.profiles import DeviceProfile
from ec2moe_jax.scheduler.model import stage_time
from ec2moe_jax.sharding import unbox

MAX_ETA = 10.0  # Calibration's bound on an efficiency (caches may beat a measured roofline)


def _interleaved_medians(calls, repeats: int, warmup: int = 2) -> list[float]:
    """Median seconds of each ``(fn, x)`` in ``calls``, timed round-robin so that bursts of
    load from other processes spread over all stages instead of skewing one."""
    for fn, x in calls:
        for _ in range(warmup):  # compile, then let caches and thread pools settle
            jax.block_until_ready(fn(x))
    ts = np.zeros((repeats, len(calls)))
    for r in range(repeats):
        for i, (fn, x) in enumerate(calls):
            t = time.perf_counter()
            jax.block_until_ready(fn(x))
            ts[r, i] = time.perf_counter() - t
    return np.median(ts, 0).tolist()


def time_stages(cfg: ModelConfig, tokens=(1, 16, 64, 256), repeats: int = 15,
                seed: int = 0, holdout_tokens: int = 64) -> list[dict]:
    """Measured median seconds of each stage at each token count (batch 1), with the
    stage's FLOPs and weight bytes from :func:`~ec2moe_jax.models.costs.model_costs` and its
    role: "validate" for the first half of the stack and for ``holdout_tokens``, else "fit"."""
    model = MoELM(cfg)
    params = unbox(init_params(model, jax.random.key(seed)))
    v = {"params": params}
    costs = model_costs(cfg)
    L = cfg.num_layers
    half = max(L // 2, 1)
    out, calls = [], []
    stages = [(f"layers_0_{L}", 0, L), (f"layers_0_{half}", 0, half), ("layer_0", 0, 1),
              (f"layer_{L - 1}", L - 1, L)]
    for t in tokens:
        x = jax.random.normal(jax.random.key(t), (1, t, cfg.d_model), jnp.float32)
        flops_l = t * costs.layer_flops(t / 2)
        held = t == holdout_tokens
        for name, a, b in stages:
            calls.append((jax.jit(lambda x, a=a, b=b: model.apply(v, x, a, b,
                                                                  method="layers")[0]), x))
            out.append({"stage": name, "tokens": t, "flops": float(flops_l[a:b].sum()),
                        "bytes": float(costs.layer_bytes()[a:b].sum()), "layers": b - a,
                        "role": "validate" if held or (a, b) == (0, half) else "fit"})
        calls.append((jax.jit(lambda x: model.apply(v, x, method="head")), x))
        out.append({"stage": "head", "tokens": t, "flops": t * costs.head_flops,
                    "bytes": costs.head_bytes, "layers": 0, "role": "validate" if held else "fit"})
    for row, sec in zip(out, _interleaved_medians(calls, repeats), strict=True):
        row["seconds"] = sec
    return out


def fit_stage_model(flops, nbytes, layers, seconds, F: float, BW: float,
                    max_eta: float = MAX_ETA) -> dict:
    """Coefficients of :func:`~ec2moe_jax.scheduler.model.stage_time` minimising the squared
    *relative* error over the given stage jobs (so the 50 us head weighs like the 20 ms
    stack): ``eta_flops``, ``eta_bw`` in (0, max_eta], ``overhead_s``, ``layer_overhead_s``
    >= 0. The model is linear in (1/eta_f, 1/eta_b, overhead, layer_overhead), so this is a
    bounded non-negative least squares, solved exactly by trying every active set (4
    coefficients: 16 small least-squares problems)."""
    m = np.asarray(seconds, np.float64)
    X = np.stack([np.asarray(flops, np.float64) / F, np.asarray(nbytes, np.float64) / BW,
                  np.ones_like(m), np.asarray(layers, np.float64)], -1) / m[:, None]
    lo = np.array([1 / max_eta, 1 / max_eta, 0.0, 0.0])
    r = 1.0 - X @ lo
    best, coef = np.inf, np.zeros(4)
    for mask in range(16):
        idx = [j for j in range(4) if mask >> j & 1]
        x = np.zeros(4)
        if idx:
            x[idx] = np.linalg.lstsq(X[:, idx], r, rcond=None)[0]
        if np.all(x >= 0):
            cost = float(np.sum((X @ x - r) ** 2))
            if cost < best - 1e-15:
                best, coef = cost, x
    c = lo + coef
    return {"eta_flops": float(1 / c[0]), "eta_bw": float(1 / c[1]),
            "overhead_s": float(c[2]), "layer_overhead_s": float(c[3])}


def predict(rows, profile: DeviceProfile, eta_f, eta_b, overhead, layer_overhead=0.0):
    """Predicted seconds of each timing row under :func:`~.model.stage_time` with these
    coefficients."""
    col = lambda k: np.array([r[k] for r in rows], np.float64)  # noqa: E731
    return stage_time(col("flops"), col("bytes"), col("layers"),
                      eta_f * profile.available_flops, eta_b * profile.available_bandwidth,
                      overhead, layer_overhead)


def fit(rows, profile: DeviceProfile) -> dict:
    """Fits :func:`fit_stage_model` on the "fit" rows; returns the coefficients and the
    relative errors on fit and validation rows (and annotates every row with its
    prediction)."""
    train = [r for r in rows if r["role"] == "fit"]
    # Efficiencies are relative to the *measured* profile (load removed: the measurement
    # already ran under it), so caches can push the bandwidth one above 1.
    profile = profile.with_load(0.0)
    col = lambda k, sel: np.array([r[k] for r in sel], np.float64)  # noqa: E731
    c = fit_stage_model(col("flops", train), col("bytes", train), col("layers", train),
                        col("seconds", train), profile.available_flops,
                        profile.available_bandwidth)
    coefs = (c["eta_flops"], c["eta_bw"], c["overhead_s"], c["layer_overhead_s"])

    def rel_err(sel):
        return np.abs(predict(sel, profile, *coefs) / col("seconds", sel) - 1)

    val = [r for r in rows if r["role"] == "validate"]
    for r, p in zip(rows, predict(rows, profile, *coefs), strict=True):
        r["predicted"] = float(p)
        r["rel_error"] = float(p / r["seconds"] - 1)
    ev, et = rel_err(val), rel_err(train)
    return {**c, "fit_rows": len(train), "validate_rows": len(val),
            "fit_median_rel_error": float(np.median(et)),
            "fit_max_rel_error": float(np.max(et)),
            "validate_median_rel_error": float(np.median(ev)),
            "validate_max_rel_error": float(np.max(ev)),
            "validate_within_25pct": int(np.sum(ev <= 0.25))}
