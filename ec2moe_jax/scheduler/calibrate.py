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

The fitted coefficients travel as a :class:`Calibration` (built from any fit record by
:meth:`Calibration.from_fit`); :func:`predict` is the one prediction from it, and
:func:`this_cpu` turns the calibration files (paths given by the caller) into this machine's
device profile and calibrations.
"""

from __future__ import annotations

import dataclasses
import os
import time

import jax
import jax.numpy as jnp
import numpy as np

from ec2moe_jax.config import ModelConfig
from ec2moe_jax.files import read_json
from ec2moe_jax.models.costs import model_costs
from ec2moe_jax.models.lm import MoELM, init_params
from ec2moe_jax.profiles import DeviceProfile
from ec2moe_jax.scheduler.model import stage_time
from ec2moe_jax.sharding import unbox

MAX_ETA = 10.0  # Calibration's bound on an efficiency (caches may beat a measured roofline)
CALIBRATE_COMMAND = "ec2moe calibrate"  # writes results/calibration_cpu.json
PIPELINE_CALIBRATION_COMMAND = "ec2moe pipeline-calibration"  # results/pipeline_calibration.json


@dataclasses.dataclass(frozen=True)
class Calibration:
    """Achieved fractions of a device's roofline and fixed costs per stage call and per layer
    (the coefficients of :func:`~ec2moe_jax.scheduler.model.stage_time`).

    ``eta_flops`` scales available FLOP/s, ``eta_bw`` available memory bandwidth,
    ``overhead_s`` is paid once per job (dispatch, kernel launches), ``layer_overhead_s`` once
    per transformer layer of a job (its XLA ops; collectives on a sharded mesh). It comes last
    so that positional ``Calibration(eta_flops, eta_bw, overhead_s, source)`` keeps working
    (with no per-layer cost). Defaults are round values of the development CPU's fit;
    :func:`load_calibration` reads the exact fit from ``ec2moe calibrate``'s file.

    Raises:
      ValueError: an efficiency outside (0, 10] or a negative overhead.
    """

    eta_flops: float = 0.3
    eta_bw: float = 0.5
    overhead_s: float = 2e-4
    source: str = "default (rounded CPU fit)"
    layer_overhead_s: float = 0.0

    def __post_init__(self):
        for f in ("eta_flops", "eta_bw"):
            v = getattr(self, f)
            if not 0 < v <= MAX_ETA:
                raise ValueError(f"Calibration {f}={v} must lie in (0, {MAX_ETA:g}] (a fraction "
                                 "of the profile's roofline; above 1 only where caches beat it)")
        if self.overhead_s < 0 or self.layer_overhead_s < 0:
            raise ValueError(f"Calibration overhead_s={self.overhead_s} and layer_overhead_s="
                             f"{self.layer_overhead_s} must be >= 0")

    @classmethod
    def from_fit(cls, fit: dict, source: str, *, clamp: bool = False) -> Calibration:
        """The calibration of a fit record: :func:`fit_stage_model`'s result, the ``"fit"`` of
        ``ec2moe calibrate``'s file, or a serialised :class:`Calibration` (``eta_flops``,
        ``eta_bw``, ``overhead_s``, optional ``layer_overhead_s``; other keys ignored).

        ``clamp``: cap both efficiencies at 1. An efficiency above 1 means this CPU's caches
        beat a roofline measured under contention; a spec-sheet preset's peak is a hard
        ceiling, so a calibration applied to presets is clamped.
        """
        ef, eb = float(fit["eta_flops"]), float(fit["eta_bw"])
        if clamp:
            ef, eb = min(ef, 1.0), min(eb, 1.0)
        return cls(ef, eb, float(fit["overhead_s"]), source,
                   float(fit.get("layer_overhead_s", 0.0)))


def load_calibration(path: str | os.PathLike) -> Calibration:
    """The fitted coefficients in ``path`` (``ec2moe calibrate`` writes it, e.g.
    ``results/calibration_cpu.json``), clamped to <= 1 for use on spec-sheet presets.

    Raises:
      FileNotFoundError: ``path`` is missing (the message names ``ec2moe calibrate``).
    """
    rec = read_json(path, what="the CPU calibration", command=CALIBRATE_COMMAND)
    return Calibration.from_fit(rec["fit"], f"fitted on this CPU ({os.path.basename(path)}), "
                                "clamped to <= 1", clamp=True)


def this_cpu(cfg: ModelConfig, calibration: str | os.PathLike,
             pipeline_calibration: str | os.PathLike | None = None, *,
             expert_fraction: float = 0.5) -> tuple[DeviceProfile, Calibration, Calibration]:
    """This CPU as the end and the cloud device of ``cfg``'s model.

    Args:
      cfg: the model (its weights set the memory budget).
      calibration: ``ec2moe calibrate``'s file (``results/calibration_cpu.json``): the
        measured profile (peak FLOP/s, copy bandwidth) and the single-device fit.
      pipeline_calibration: ``ec2moe pipeline-calibration``'s file
        (``results/pipeline_calibration.json``) with per-submesh refits (end: 2 fake devices;
        cloud: 6, experts sharded), or None to use the single-device fit for both,
        *unclamped* (we model this very machine, where caches beat the copy bandwidth).
      expert_fraction: share of the experts the end's memory holds besides the fixed
        weights (what an app may get on a phone), plus 4 MB for activations and KV cache.

    Returns:
      ``(profile, end calibration, cloud calibration)``.

    Raises:
      FileNotFoundError: a given file is missing (the message names the command that writes
        it).
    """
    cal = read_json(calibration, what="the CPU calibration", command=CALIBRATE_COMMAND)
    prof = cal["profile"]
    costs = model_costs(cfg)
    mem = (costs.embed_bytes + costs.head_bytes + costs.fixed_bytes.sum()
           + expert_fraction * costs.is_moe.sum() * costs.num_experts * costs.expert_bytes
           + 4e6)  # activations and KV cache headroom
    device = DeviceProfile("this-cpu", memory_bytes=float(mem), peak_flops=prof["peak_flops"],
                           mem_bandwidth=prof["mem_bandwidth"],
                           source=f"measured ({prof['source']}); memory budget: fixed weights "
                                  f"+ {expert_fraction:.0%} of the experts")
    if pipeline_calibration is not None:
        fits = read_json(pipeline_calibration, what="the pipeline calibration",
                         command=PIPELINE_CALIBRATION_COMMAND)["calibrations"]
        src = f"per-submesh refit ({os.fspath(pipeline_calibration)})"
        return (device, Calibration.from_fit(fits["refit_end"], f"end {src}"),
                Calibration.from_fit(fits["refit_cloud"], f"cloud {src}"))
    single = Calibration.from_fit(cal["fit"], f"fitted on this CPU "
                                  f"({os.fspath(calibration)}), unclamped")
    return device, single, single


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


def predict(rows, F: float, BW: float, cal: Calibration) -> np.ndarray:
    """<float64>[len(rows)] predicted seconds of each stage job under
    :func:`~.model.stage_time` with ``cal``'s coefficients.

    Args:
      rows: dicts with the job's ``"flops"``, weight ``"bytes"`` and transformer ``"layers"``.
      F, BW: the device's available FLOP/s and memory bandwidth (bytes/s), which ``cal``'s
        efficiencies scale.
    """
    col = lambda k: np.array([r[k] for r in rows], np.float64)  # noqa: E731
    return stage_time(col("flops"), col("bytes"), col("layers"), cal.eta_flops * F,
                      cal.eta_bw * BW, cal.overhead_s, cal.layer_overhead_s)


def fit(rows, profile: DeviceProfile) -> dict:
    """Fits :func:`fit_stage_model` on the "fit" rows; returns the coefficients and the
    relative errors on fit and validation rows (and annotates every row with its
    prediction)."""
    train = [r for r in rows if r["role"] == "fit"]
    # Efficiencies are relative to the *measured* profile (load removed: the measurement
    # already ran under it), so caches can push the bandwidth one above 1.
    profile = profile.with_load(0.0)
    col = lambda k, sel: np.array([r[k] for r in sel], np.float64)  # noqa: E731
    F, BW = profile.available_flops, profile.available_bandwidth
    c = fit_stage_model(col("flops", train), col("bytes", train), col("layers", train),
                        col("seconds", train), F, BW)
    cal = Calibration.from_fit(c, "fit")

    def rel_err(sel):
        return np.abs(predict(sel, F, BW, cal) / col("seconds", sel) - 1)

    val = [r for r in rows if r["role"] == "validate"]
    for r, p in zip(rows, predict(rows, F, BW, cal), strict=True):
        r["predicted"] = float(p)
        r["rel_error"] = float(p / r["seconds"] - 1)
    ev, et = rel_err(val), rel_err(train)
    return {**c, "fit_rows": len(train), "validate_rows": len(val),
            "fit_median_rel_error": float(np.median(et)),
            "fit_max_rel_error": float(np.max(et)),
            "validate_median_rel_error": float(np.median(ev)),
            "validate_max_rel_error": float(np.max(ev)),
            "validate_within_25pct": int(np.sum(ev <= 0.25))}
