"""The LM training loop: sharded state, resumable orbax checkpoints, evaluation in bits/char.

A run lives in a *workdir*: ``config.json`` (the experiment), ``checkpoints/`` (orbax),
``metrics.jsonl`` (one JSON record per log/eval event) and ``result.json`` (final figures).
Batches are a pure function of (seed, step), so a run resumed from its last checkpoint sees
exactly the batches, and reaches exactly the parameters, of an uninterrupted run.
"""

from __future__ import annotations

import dataclasses
import json
import os
import sys
import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh
from tqdm.auto import tqdm

from ec2moe_jax import data as data_lib
from ec2moe_jax.config import ExperimentConfig, config_diff, config_keys, from_dict
from ec2moe_jax.files import write_json_atomic
from ec2moe_jax.models import MoELM
from ec2moe_jax.sharding import (
    batch_sharding,
    param_shardings,
    replicated,
    training_mesh,
    unbox,
    use_mesh,
)
from ec2moe_jax.training.checkpoint import Checkpointer, abstract_with_shardings
from ec2moe_jax.training.steps import (
    TrainState,
    bits_per_char,
    make_eval_step,
    make_optimizer,
    make_train_step,
)


@dataclasses.dataclass
class Setup:
    """Everything a run needs besides data: model, optimiser, mesh, shardings, jitted steps."""

    cfg: ExperimentConfig
    mesh: Mesh
    model: MoELM
    state_shardings: TrainState
    abstract_state: TrainState
    init_state: Any  # rng -> TrainState, jitted with out_shardings
    train_step: Any  # (state, batch) -> (state, metrics), jitted, state donated
    eval_step: Any  # (params, batch) -> sums, jitted


def build(cfg: ExperimentConfig, mesh: Mesh | None = None) -> Setup:
    """Builds the model and jitted, sharded steps on ``mesh`` (default: all devices)."""
    mesh = training_mesh(cfg.mesh) if mesh is None else mesh
    if cfg.train.batch_size % mesh.shape["data"]:
        raise ValueError(f"train.batch_size={cfg.train.batch_size} not divisible by the mesh "
                         f"'data' axis of size {mesh.shape['data']}")
    cfg.model.moe.validate(expert_shards=mesh.shape["expert"])
    model = MoELM(cfg.model)
    optimizer = make_optimizer(cfg.train)
    tokens = jnp.zeros((1, min(8, cfg.model.max_seq_len)), jnp.int32)

    def boxed_state(rng):
        params = model.init(rng, tokens)["params"]
        return TrainState(step=jnp.zeros((), jnp.int32), params=params,
                          opt_state=optimizer.init(params))

    boxed = jax.eval_shape(boxed_state, jax.random.key(0))
    shardings = param_shardings(boxed, mesh)
    abstract = abstract_with_shardings(unbox(boxed), shardings)
    init_state = jax.jit(lambda rng: unbox(boxed_state(rng)), out_shardings=shardings)
    batch_sh = {"inputs": batch_sharding(mesh), "targets": batch_sharding(mesh)}
    train_step = jax.jit(
        make_train_step(model, optimizer, cfg.model.moe),
        in_shardings=(shardings, batch_sh),
        out_shardings=(shardings, replicated(mesh)),
        donate_argnums=0,
    )
    eval_sh = {**batch_sh, "mask": batch_sharding(mesh)}
    eval_step = jax.jit(make_eval_step(model), in_shardings=(shardings.params, eval_sh),
                        out_shardings=replicated(mesh))
    return Setup(cfg, mesh, model, shardings, abstract, init_state, train_step, eval_step)


def evaluate(
    setup: Setup,
    params,
    tokens: np.ndarray,
    max_batches: int | None = None,
    stride: int | None = -1,
    progress: str | None = None,
) -> float:
    """Bits per character (byte) of ``tokens`` under ``params``, each target counted once.

    ``stride``: window stride of :func:`ec2moe_jax.data.eval_batches`; the default ``-1``
    takes ``train.eval_stride`` from the config, ``None`` means non-overlapping windows.
    ``progress``: a label for a progress bar (None: none).
    """
    t = setup.cfg.train
    stride = t.eval_stride if stride == -1 else stride
    with use_mesh(setup.mesh):
        return bits_per_char(setup.eval_step, params, tokens, batch_size=t.batch_size,
                             seq_len=t.seq_len, max_batches=max_batches, stride=stride,
                             progress=progress)


def save_config(cfg: ExperimentConfig, workdir: str, kind: str = "train_state") -> None:
    """Writes ``config.json``; ``kind`` says what the checkpoints hold (train state/params)."""
    d = dataclasses.asdict(cfg)
    name = d.pop("name")
    write_json_atomic(os.path.join(workdir, "config.json"),
                      {"name": name, "kind": kind, "config": d})


def _read_workdir(workdir: str) -> dict:
    path = os.path.join(os.path.expanduser(workdir), "config.json")
    if not os.path.exists(path):
        raise FileNotFoundError(f"{path!r} not found: {workdir!r} is not a training workdir "
                                "(train one first with `ec2moe train --workdir ...`)")
    with open(path) as f:
        return json.load(f)


def load_workdir_config(workdir: str) -> ExperimentConfig:
    saved = _read_workdir(workdir)
    return from_dict(saved["name"], saved["config"])


def save_params(cfg: ExperimentConfig, workdir: str, params) -> None:
    """Saves parameters alone (e.g. an imported model) as a workdir :func:`load_params` reads."""
    workdir = os.path.abspath(os.path.expanduser(workdir))
    os.makedirs(workdir, exist_ok=True)
    ckpt = Checkpointer(os.path.join(workdir, "checkpoints"), keep=1)
    ckpt.save(0, {"params": params})
    ckpt.close()
    save_config(cfg, workdir, kind="params")


# Fields that may change when a run resumes: evaluation, logging and checkpoint cadence (and
# the mesh, which is not part of the config). Everything else shapes the trajectory.
_CADENCE_FIELDS = ("train.eval_every", "train.eval_batches", "train.eval_stride",
                   "train.checkpoint_every", "train.keep_checkpoints", "train.log_every")


def _resumed_config(cfg: ExperimentConfig, workdir: str, progress: bool) -> ExperimentConfig:
    """The config a run in ``workdir`` resumes with: ``cfg``, where a larger ``train.steps``
    extends the saved run (its schedule keeps its length; the extra steps train at the final
    learning rate).

    Raises:
      ValueError: the workdir holds imported parameters, or ``cfg`` differs from the saved
        run in a field that shapes the trajectory (each differing field is named).
    """
    saved = _read_workdir(workdir)
    if saved.get("kind") == "params":
        raise ValueError(f"{workdir!r} holds imported parameters, not a training run; "
                         "train in another --workdir")
    old = from_dict(saved["name"], saved["config"])
    old_schedule = old.train.schedule_steps or old.train.steps
    if cfg.train.steps < old.train.steps:
        raise ValueError(f"{workdir!r} holds a run of train.steps={old.train.steps}; resume "
                         f"it with at least that many (more extend it), not {cfg.train.steps}, "
                         "or use a new --workdir")
    if cfg.train.schedule_steps not in (None, old_schedule):
        raise ValueError(f"{workdir!r} holds a run whose schedule spans {old_schedule} steps; "
                         f"train.schedule_steps={cfg.train.schedule_steps} would change it")
    free = set(_CADENCE_FIELDS) | {"train.steps", "train.schedule_steps"}
    keys = [k for k in config_keys(old) if k not in free]
    diffs = config_diff(old, cfg, keys)
    if diffs:
        raise ValueError(f"{workdir!r} holds a checkpoint of a different run (saved -> now: "
                         + "; ".join(diffs) + "); resume with the same config and flags, or "
                         "use a new --workdir")
    if cfg.train.steps > old_schedule and progress:
        print(f"extending the run in {workdir} from {old_schedule} to {cfg.train.steps} steps: "
              f"steps after {old_schedule} train at the final learning rate (a fresh "
              f"{cfg.train.steps}-step run would differ)", file=sys.stderr, flush=True)
    return cfg.replace(train__schedule_steps=old_schedule if cfg.train.steps > old_schedule
                       else old.train.schedule_steps)


def read_curve(workdir: str) -> list[dict]:
    """The periodic validation records of a run (last record per step wins on resume)."""
    by_step: dict[int, dict] = {}
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        for line in f:
            r = json.loads(line)
            if "val_bits_per_char" in r:
                by_step[r["step"]] = {k: r[k] for k in ("step", "val_bits_per_char",
                                                        "wall_seconds")}
    return [by_step[s] for s in sorted(by_step)]


def _log(workdir: str, record: dict) -> None:
    with open(os.path.join(workdir, "metrics.jsonl"), "a") as f:
        f.write(json.dumps(record) + "\n")


def train(
    cfg: ExperimentConfig,
    workdir: str,
    *,
    splits: data_lib.Splits | None = None,
    mesh: Mesh | None = None,
    stop_at: int | None = None,
    progress: bool = True,
    final_eval_batches: int | None = None,
) -> dict:
    """Trains (or resumes) ``cfg`` in ``workdir``; returns the final result record.

    Args:
      cfg: the experiment.
      workdir: run directory; an existing checkpoint there is resumed.
      splits: tokenised data (default: prepared from ``cfg.data``).
      mesh: training mesh (default: all devices, see :func:`training_mesh`).
      stop_at: stop (with a checkpoint) at this step, as an interruption would.
      progress: show a progress bar.
      final_eval_batches: cap the final val/test evaluations (None: whole splits).

    Returns:
      ``{"steps", "tokens_seen", "wall_seconds", "bits_per_char_val", ...}``; after the last
      step also ``bits_per_char_test`` (written to ``result.json`` too).
    """
    workdir = os.path.abspath(os.path.expanduser(workdir))
    os.makedirs(workdir, exist_ok=True)
    ckpt = Checkpointer(os.path.join(workdir, "checkpoints"), keep=cfg.train.keep_checkpoints)
    if ckpt.latest_step() is not None:
        cfg = _resumed_config(cfg, workdir, progress)
    splits = data_lib.prepare_splits(cfg.data) if splits is None else splits
    setup = build(cfg, mesh)
    save_config(cfg, workdir)
    t = cfg.train
    tokens_per_step = t.batch_size * t.seq_len
    target = t.steps if stop_at is None else min(stop_at, t.steps)

    meta = {"elapsed_seconds": jnp.zeros((), jnp.float32)}
    if ckpt.latest_step() is not None:
        abstract = {"state": setup.abstract_state,
                    "meta": {"elapsed_seconds": jax.ShapeDtypeStruct((), jnp.float32)}}
        restored = ckpt.restore(abstract)
        state, meta = restored["state"], restored["meta"]
    else:
        state = setup.init_state(jax.random.key(t.seed))
    step = int(state.step)
    elapsed = float(meta["elapsed_seconds"])
    last_val = None

    def checkpoint(state, elapsed):
        ckpt.save(int(state.step), {"state": state,
                                    "meta": {"elapsed_seconds": jnp.float32(elapsed)}})

    bar = tqdm(total=target, initial=step, disable=not progress, desc=f"train {cfg.name}",
               unit="step", dynamic_ncols=True)
    t0, window_start, window_steps = time.perf_counter(), time.perf_counter(), 0
    pending = None  # the previous step's loss: waiting on it keeps the bar's rate honest
    try:
        with use_mesh(setup.mesh):
            while step < target:
                batch = data_lib.train_batch(splits.train, step, batch_size=t.batch_size,
                                             seq_len=t.seq_len, seed=t.seed)
                state, metrics = setup.train_step(state, batch)
                # Dispatch is asynchronous: without a wait the bar counts queued steps and
                # stalls at each logging sync. Waiting one step behind keeps one step queued.
                if pending is not None:
                    pending.block_until_ready()
                pending = metrics["loss"]
                step += 1
                window_steps += 1
                if step % t.log_every == 0 or step == target:
                    m = {k: float(v) for k, v in jax.device_get(metrics).items()}
                    now = time.perf_counter()
                    rate = window_steps * tokens_per_step / max(now - window_start, 1e-9)
                    window_start, window_steps = now, 0
                    bar.set_postfix(loss=f"{m['loss']:.3f}", tok_s=f"{rate:,.0f}")
                    _log(workdir, {"step": step, **m, "tokens_per_s": rate,
                                   "wall_seconds": elapsed + now - t0})
                if step % t.eval_every == 0 or step == t.steps:
                    last_val = evaluate(setup, state.params, splits.val, t.eval_batches,
                                        progress="validation" if progress else None)
                    bar.write(f"step {step}: val bits/char {last_val:.4f}")
                    _log(workdir, {"step": step, "val_bits_per_char": last_val,
                                   "wall_seconds": elapsed + time.perf_counter() - t0})
                if step % t.checkpoint_every == 0 or step == target:
                    checkpoint(state, elapsed + time.perf_counter() - t0)
                bar.update(1)
    except KeyboardInterrupt:
        try:
            checkpoint(state, elapsed + time.perf_counter() - t0)
            bar.write(f"interrupted: checkpoint at step {int(state.step)}; rerun to resume")
        except Exception:  # noqa: BLE001 - interrupted inside a step: its inputs were donated
            bar.write(f"interrupted mid-step; resume from the last checkpoint (step "
                      f"{ckpt.latest_step()})")
        raise
    finally:
        bar.close()
    elapsed += time.perf_counter() - t0
    ckpt.close()

    result: dict[str, Any] = {
        "config": cfg.name,
        "steps": step,
        "tokens_seen": step * tokens_per_step,
        "wall_seconds": round(elapsed, 1),
        "bits_per_char_val": last_val,
        "devices": f"{len(setup.mesh.devices.flat)} x {jax.devices()[0].platform}",
        "method": "measured",
    }
    if step >= t.steps:
        cap = final_eval_batches
        label = (lambda s: f"final eval: {s}") if progress else (lambda s: None)
        result["bits_per_char_val"] = evaluate(setup, state.params, splits.val, cap,
                                               progress=label("validation"))
        result["bits_per_char_test"] = evaluate(setup, state.params, splits.test, cap,
                                                progress=label("test"))
        result["bits_per_char_test_nonoverlapping"] = evaluate(
            setup, state.params, splits.test, cap, stride=None,
            progress=label("test, disjoint windows"))
        result["eval_method"] = (
            f"bytes of the held-out split scored once each, windows of {t.seq_len}; "
            + (f"sliding stride {t.eval_stride} (>= {t.seq_len - t.eval_stride} bytes of "
               "context after the first window)" if t.eval_stride else "non-overlapping")
            + "; the _nonoverlapping figure uses disjoint windows"
            + (f"; first {cap} batches of each split only" if cap else "")
        )
        result["curve"] = read_curve(workdir)
        write_json_atomic(os.path.join(workdir, "result.json"), result)
    result["state"] = state
    return result


def load_params(workdir: str, mesh: Mesh | None = None) -> tuple[Setup, Any]:
    """Loads ``(setup, params)`` from a workdir's latest checkpoint onto ``mesh``."""
    saved = _read_workdir(workdir)
    cfg = from_dict(saved["name"], saved["config"])
    setup = build(cfg, mesh)
    ckpt = Checkpointer(os.path.join(os.path.expanduser(workdir), "checkpoints"),
                        keep=cfg.train.keep_checkpoints, create=False)
    if ckpt.latest_step() is None:
        raise FileNotFoundError(f"no checkpoint under {ckpt.directory!r}; train first")
    if saved.get("kind") == "params":
        params = ckpt.restore({"params": setup.abstract_state.params})["params"]
    else:
        abstract = {"state": setup.abstract_state,
                    "meta": {"elapsed_seconds": jax.ShapeDtypeStruct((), jnp.float32)}}
        params = ckpt.restore(abstract)["state"].params
    ckpt.close()
    return setup, params

