"""Calibration of the roofline stage-time model on the machine at hand.

Times the small model's stages (all layers, single layers, the LM head) at several token
counts with ``jax.block_until_ready`` (repeats, medians: the CPU may be shared), then fits
``time = overhead + max(FLOPs / (eta_f F), bytes / (eta_b BW))`` where F and BW are this
machine's live matmul FLOP/s and copy bandwidth (:func:`ec2moe_jax.profiles.measure`).
The fit uses the whole-stack timings; single layers and the head are held out to validate.
Presets are then scaled by the same efficiencies (an assumption for devices we do not have).
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


def _median_time(fn, x, repeats: int) -> float:
    jax.block_until_ready(fn(x))  # compile and warm up
    ts = []
    for _ in range(repeats):
        t = time.perf_counter()
        jax.block_until_ready(fn(x))
        ts.append(time.perf_counter() - t)
    return float(np.median(ts))


def time_stages(cfg: ModelConfig, tokens=(1, 16, 64, 256), repeats: int = 7,
                seed: int = 0) -> list[dict]:
    """Measured median seconds of each stage at each token count (batch 1), with the
    stage's FLOPs and weight bytes from :func:`~ec2moe_jax.models.costs.model_costs`."""
    model = MoELM(cfg)
    params = unbox(init_params(model, jax.random.key(seed)))
    v = {"params": params}
    costs = model_costs(cfg)
    L = cfg.num_layers
    out = []
    stages = [(f"layers_0_{L}", 0, L), ("layer_0", 0, 1), (f"layer_{L - 1}", L - 1, L)]
    for t in tokens:
        x = jax.random.normal(jax.random.key(t), (1, t, cfg.d_model), jnp.float32)
        flops_l = t * costs.layer_flops(t / 2)
        for name, a, b in stages:
            fn = jax.jit(lambda x, a=a, b=b: model.apply(v, x, a, b, method="layers")[0])
            out.append({"stage": name, "tokens": t, "seconds": _median_time(fn, x, repeats),
                        "flops": float(flops_l[a:b].sum()),
                        "bytes": float(costs.layer_bytes()[a:b].sum()),
                        "role": "fit" if (a, b) == (0, L) else "validate"})
        fn = jax.jit(lambda x: model.apply(v, x, method="head"))
        out.append({"stage": "head", "tokens": t, "seconds": _median_time(fn, x, repeats),
                    "flops": t * costs.head_flops, "bytes": costs.head_bytes,
                    "role": "validate"})
    return out


def predict(rows, profile: DeviceProfile, eta_f: float, eta_b: float, overhead: float):
    """Predicted seconds of each timing row under the roofline with these coefficients."""
    fl = np.array([r["flops"] for r in rows])
    by = np.array([r["bytes"] for r in rows])
    return overhead + np.maximum(fl / (eta_f * profile.available_flops),
                                 by / (eta_b * profile.available_bandwidth))


def fit(rows, profile: DeviceProfile) -> dict:
    """Grid search (log-spaced efficiencies, overhead) minimising the squared log error on the
    "fit" rows; returns the coefficients and the error on fit and validation rows."""
    train = [r for r in rows if r["role"] == "fit"]
    meas = np.array([r["seconds"] for r in train])
    best = None
    # Efficiencies are relative to the *measured* profile (load removed: the measurement
    # already ran under it), so caches can push the bandwidth one above 1.
    profile = profile.with_load(0.0)
    for ef in np.logspace(-2.5, 1, 57):
        for eb in np.logspace(-2.5, 1, 57):
            for oh in np.concatenate([[0.0], np.logspace(-6, -2, 41)]):
                err = np.mean(np.log(predict(train, profile, ef, eb, oh) / meas) ** 2)
                if best is None or err < best[0]:
                    best = (err, ef, eb, oh)
    _, ef, eb, oh = best

    def rel_err(sel):
        m = np.array([r["seconds"] for r in sel])
        return np.abs(predict(sel, profile, ef, eb, oh) / m - 1)

    val = [r for r in rows if r["role"] == "validate"]
    for r, p in zip(rows, predict(rows, profile, ef, eb, oh), strict=True):  # noqa: B905
        r["predicted"] = float(p)
    return {"eta_flops": float(ef), "eta_bw": float(eb), "overhead_s": float(oh),
            "fit_median_rel_error": float(np.median(rel_err(train))),
            "fit_max_rel_error": float(np.max(rel_err(train))),
            "validate_median_rel_error": float(np.median(rel_err(val))),
            "validate_max_rel_error": float(np.max(rel_err(val)))}
