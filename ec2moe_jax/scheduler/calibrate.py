"""Calibration of the roofline stage-time model on the machine at hand.

Times the small model's stages (the whole stack, the first half, single layers, the LM head)
at several token counts with ``jax.block_until_ready`` (warm-up calls, then the median of
repeats timed round-robin over the stages: the CPU may be shared), then fits
``time = overhead + max(FLOPs / (eta_f F), bytes / (eta_b BW))`` jointly over the three
coefficients, where F and BW are this machine's live matmul FLOP/s and copy bandwidth
(:func:`ec2moe_jax.profiles.measure`). The per-call overhead (dispatch latency) dominates
tiny stages such as the head on CPU, so the fit sees stages of very different sizes.
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
from ec2moe_jax.sharding import unbox


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
                        "bytes": float(costs.layer_bytes()[a:b].sum()),
                        "role": "validate" if held or (a, b) == (0, half) else "fit"})
        calls.append((jax.jit(lambda x: model.apply(v, x, method="head")), x))
        out.append({"stage": "head", "tokens": t, "flops": t * costs.head_flops,
                    "bytes": costs.head_bytes, "role": "validate" if held else "fit"})
    for row, sec in zip(out, _interleaved_medians(calls, repeats), strict=True):
        row["seconds"] = sec
    return out


def predict(rows, profile: DeviceProfile, eta_f, eta_b, overhead):
    """Predicted seconds of each timing row under the roofline with these coefficients
    (coefficients may be arrays: the rows go on a new last axis)."""
    fl = np.array([r["flops"] for r in rows])
    by = np.array([r["bytes"] for r in rows])
    ef, eb, oh = (np.asarray(c, np.float64)[..., None] for c in (eta_f, eta_b, overhead))
    return oh + np.maximum(fl / (ef * profile.available_flops),
                           by / (eb * profile.available_bandwidth))


def fit(rows, profile: DeviceProfile) -> dict:
    """Joint grid search over (eta_flops, eta_bw, overhead) minimising the mean squared log
    error on the "fit" rows (relative errors weigh the 50 us head like the 20 ms stack);
    returns the coefficients and the relative errors on fit and validation rows."""
    train = [r for r in rows if r["role"] == "fit"]
    meas = np.array([r["seconds"] for r in train])
    # Efficiencies are relative to the *measured* profile (load removed: the measurement
    # already ran under it), so caches can push the bandwidth one above 1.
    profile = profile.with_load(0.0)
    ef, eb, oh = np.meshgrid(np.logspace(-2.5, 1, 71), np.logspace(-2.5, 1, 71),
                             np.concatenate([[0.0], np.logspace(-6, -2.5, 71)]),
                             indexing="ij")
    err = np.mean(np.log(predict(train, profile, ef, eb, oh) / meas) ** 2, -1)
    k = np.unravel_index(np.argmin(err), err.shape)
    ef, eb, oh = float(ef[k]), float(eb[k]), float(oh[k])

    def rel_err(sel):
        m = np.array([r["seconds"] for r in sel])
        return np.abs(predict(sel, profile, ef, eb, oh) / m - 1)

    val = [r for r in rows if r["role"] == "validate"]
    for r, p in zip(rows, predict(rows, profile, ef, eb, oh), strict=True):
        r["predicted"] = float(p)
        r["rel_error"] = float(p / r["seconds"] - 1)
    return {"eta_flops": ef, "eta_bw": eb, "overhead_s": oh,
            "fit_rows": len(train), "validate_rows": len(val),
            "fit_median_rel_error": float(np.median(rel_err(train))),
            "fit_max_rel_error": float(np.max(rel_err(train))),
            "validate_median_rel_error": float(np.median(rel_err(val))),
            "validate_max_rel_error": float(np.max(rel_err(val)))}
