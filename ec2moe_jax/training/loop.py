"""The LM training loop: sharded state, resumable orbax checkpoints, evaluation in bits/char.

A run lives in a *workdir*: ``config.json`` (the experiment), ``checkpoints/`` (orbax),
``metrics.jsonl`` (one JSON record per log/eval event) and ``result.json`` (final figures).
Batches are a pure function of (seed, step), so a run resumed from its last checkpoint sees
exactly the batches, and (on the same device count) reaches exactly the parameters, of an
uninterrupted run.

Nothing silent: a step whose loss or gradient norm is not finite stops the run with
:class:`TrainingDiverged` naming the step (the checkpoints keep the last good state); results
and metrics are strict JSON; a half-written last line of ``metrics.jsonl`` (a killed run) is
skipped with a warning and cut off before the resumed run appends; a damaged checkpoint is
reported and the newest intact one resumed (see :mod:`.checkpoint`).
"""

from __future__ import annotations

import dataclasses
import os
import sys
import time
import warnings
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh
from tqdm.auto import tqdm

from ec2moe_jax import data as data_lib
from ec2moe_jax.config import (
    ExperimentConfig,
    config_diff,
    config_keys,
    from_dict,
    require_byte_vocab,
)
from ec2moe_jax.files import (
    append_jsonl,
    get_field,
    read_json,
    read_jsonl,
    repair_jsonl,
    write_json_atomic,
)
from ec2moe_jax.models import MoELM
from ec2moe_jax.sharding import (
    batch_sharding,
    param_shardings,
    replicated,
    training_mesh,
    unbox,
    use_mesh,
)
from ec2moe_jax.training.checkpoint import (
    Checkpointer,
    CheckpointFallbackWarning,
    abstract_with_shardings,
)
from ec2moe_jax.training.residency import step_residency
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
    train_sh = dict(batch_sh, allowed=replicated(mesh)) if cfg.train.residency_prob else batch_sh
    train_step = jax.jit(
        make_train_step(model, optimizer, cfg.model.moe),
        in_shardings=(shardings, train_sh),
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
    """``config.json`` of a workdir, checked: an object with a string ``name``, a ``kind``
    and a ``config`` object.

    Raises:
      FileNotFoundError: ``workdir`` holds no ``config.json``.
      ValueError: the file is not JSON or lacks a field (the message names the file and it).
    """
    path = os.path.join(os.path.expanduser(workdir), "config.json")
    if not os.path.exists(path):
        raise FileNotFoundError(f"{path!r} not found: {workdir!r} is not a training workdir "
                                "(train one first with `ec2moe train --workdir ...`)")
    saved = read_json(path, what="run config", command="ec2moe train --workdir ...")
    get_field(saved, "name", str, path=path, what="run config")
    get_field(saved, "config", dict, path=path, what="run config")
    kind = get_field(saved, "kind", str, path=path, what="run config", default="train_state")
    if kind not in ("train_state", "params"):
        raise ValueError(f"run config {path!r}: field 'kind' must be 'train_state' or "
                         f"'params', got {kind!r}")
    return saved


def load_workdir_config(workdir: str) -> ExperimentConfig:
    """The validated config of a workdir (its ``config.json``).

    Raises:
      FileNotFoundError, ValueError: see :func:`_read_workdir`; a field of the wrong type or
        value (the message names the file and the field).
    """
    saved = _read_workdir(workdir)
    return from_dict(saved["name"], saved["config"],
                     os.path.join(os.path.expanduser(workdir), "config.json"))


def save_params(cfg: ExperimentConfig, workdir: str, params) -> None:
    """Saves parameters alone (e.g. an imported model) as a workdir :func:`load_params` reads."""
    workdir = os.path.abspath(os.path.expanduser(workdir))
    os.makedirs(workdir, exist_ok=True)
    ckpt = Checkpointer(os.path.join(workdir, "checkpoints"), keep=1)
    ckpt.save(0, {"params": params})
    ckpt.close()
    save_config(cfg, workdir, kind="params")


class TrainingDiverged(ValueError):
    """A training step produced a non-finite loss or gradient norm."""


def _items(state: TrainState, elapsed) -> dict:
    """A training checkpoint's items: the parameters alone (what inference restores) and the
    rest of the train state (optimizer state, step, wall time)."""
    return {"params": state.params,
            "train": {"step": state.step, "opt_state": state.opt_state,
                      "elapsed_seconds": jnp.asarray(elapsed, jnp.float32)}}


def _abstract_items(setup: Setup) -> tuple[dict, tuple]:
    """(abstract items of :func:`_items`, the ``legacy`` argument of
    :meth:`Checkpointer.restore` for runs saved as one tree by older versions)."""
    a = setup.abstract_state
    scalar = jax.ShapeDtypeStruct((), jnp.float32)
    items = {"params": a.params,
             "train": {"step": a.step, "opt_state": a.opt_state, "elapsed_seconds": scalar}}
    legacy = ({"state": a, "meta": {"elapsed_seconds": scalar}},
              lambda t: _items(t["state"], t["meta"]["elapsed_seconds"]))
    return items, legacy


def _restore_state(ckpt: Checkpointer, setup: Setup) -> tuple[TrainState, float]:
    """The newest intact train state; newer damaged steps are moved aside (they would
    otherwise shadow the steps this run saves again), each with a warning."""
    items, legacy = _abstract_items(setup)
    latest = ckpt.latest_step()
    out = ckpt.restore(items, legacy=legacy)
    for step in [s for s in ckpt.all_steps() if s > ckpt.restored_step]:
        where = ckpt.quarantine(step)
        warnings.warn(f"checkpoint step {step} (of {latest}) is damaged: moved to {where}; "
                      f"resuming from step {ckpt.restored_step}", CheckpointFallbackWarning,
                      stacklevel=3)
    t = out["train"]
    state = TrainState(step=t["step"], params=out["params"], opt_state=t["opt_state"])
    return state, float(t["elapsed_seconds"])


def _check_finite(metrics: dict, step: int, ckpt: Checkpointer) -> None:
    """Raises :class:`TrainingDiverged` if step ``step``'s loss or gradient norm is not
    finite (its parameters are then not worth saving)."""
    values = {k: float(metrics[k]) for k in ("loss", "grad_norm")}
    if all(np.isfinite(v) for v in values.values()):
        return
    good = ckpt.latest_step()
    kept = (f"the last good checkpoint is step {good} in {ckpt.directory}" if good is not None
            else "no checkpoint was saved")
    raise TrainingDiverged(
        f"training diverged at step {step}: "
        + ", ".join(f"{k}={v}" for k, v in values.items())
        + f"; its parameters are not saved, {kept}. Lower train.learning_rate, raise "
        "train.warmup_steps or lower train.clip_norm, and train in a new --workdir")


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
    old = from_dict(saved["name"], saved["config"], os.path.join(workdir, "config.json"))
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
    """The periodic validation records of a run (last record per step wins on resume); a
    half-written last line of ``metrics.jsonl`` is skipped with a warning.

    Raises:
      ValueError: a record that is not valid JSON (other than a half-written last line) or
        lacks a field (the message names the file and the field).
    """
    path = os.path.join(workdir, "metrics.jsonl")
    kw = {"path": path, "what": "metrics log"}
    by_step: dict[int, dict] = {}
    for r in read_jsonl(path, what="metrics log"):
        if isinstance(r, dict) and "val_bits_per_char" in r:
            by_step[get_field(r, "step", int, **kw)] = {
                "step": r["step"],
                "val_bits_per_char": get_field(r, "val_bits_per_char", float, **kw),
                "wall_seconds": get_field(r, "wall_seconds", float, **kw)}
    return [by_step[s] for s in sorted(by_step)]


def _log(workdir: str, record: dict) -> None:
    append_jsonl(os.path.join(workdir, "metrics.jsonl"), record)


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
    try:
        if ckpt.latest_step() is not None:
            cfg = _resumed_config(cfg, workdir, progress)
        require_byte_vocab(cfg.model, "training on data.source")
        splits = data_lib.prepare_splits(cfg.data) if splits is None else splits
        setup = build(cfg, mesh)
        save_config(cfg, workdir)
        if ckpt.latest_step() is not None:
            state, elapsed = _restore_state(ckpt, setup)
        else:
            state, elapsed = setup.init_state(jax.random.key(cfg.train.seed)), 0.0
        # A killed run may have left half a record; the next one must not fuse with it.
        repair_jsonl(os.path.join(workdir, "metrics.jsonl"), what="metrics log")
        target = cfg.train.steps if stop_at is None else min(stop_at, cfg.train.steps)
        state, elapsed, last_val = _loop(setup, state, elapsed, splits, workdir, ckpt, target,
                                         progress)
    finally:
        ckpt.close()
    step, t = int(state.step), cfg.train
    result: dict[str, Any] = {
        "config": cfg.name,
        "steps": step,
        "tokens_seen": step * t.batch_size * t.seq_len,
        "wall_seconds": round(elapsed, 1),
        "bits_per_char_val": last_val,
        "devices": f"{len(setup.mesh.devices.flat)} x {jax.devices()[0].platform}",
        "method": "measured",
    }
    if step >= t.steps:
        result.update(_final_evaluation(setup, state.params, splits, final_eval_batches,
                                        progress))
        result["curve"] = read_curve(workdir)
        write_json_atomic(os.path.join(workdir, "result.json"), result)
    result["state"] = state
    return result


def _loop(setup: Setup, state: TrainState, elapsed: float, splits, workdir: str,
          ckpt: Checkpointer, target: int, progress: bool) -> tuple[TrainState, float, Any]:
    """Steps from ``state.step`` to ``target``: logging, evaluation, checkpoints, Ctrl-C.
    Returns (state, wall seconds in all, the last validation bits/char or None).

    Raises:
      TrainingDiverged: a step's loss or gradient norm is not finite (checked one step
        behind, and for the step about to be checkpointed, so no non-finite state is saved).
    """
    t = setup.cfg.train
    step, last_val = int(state.step), None
    bar = tqdm(total=target, initial=step, disable=not progress, desc=f"train {setup.cfg.name}",
               unit="step", dynamic_ncols=True)
    t0, window_start, window_steps = time.perf_counter(), time.perf_counter(), 0
    now = lambda: elapsed + time.perf_counter() - t0  # noqa: E731
    pending = None  # the previous step's metrics: waiting on them keeps the bar honest
    try:
        with use_mesh(setup.mesh):
            while step < target:
                batch = data_lib.train_batch(splits.train, step, batch_size=t.batch_size,
                                             seq_len=t.seq_len, seed=t.seed)
                if t.residency_prob:
                    batch["allowed"] = step_residency(t, setup.cfg.model, step)
                state, metrics = setup.train_step(state, batch)
                # Dispatch is asynchronous: without a wait the bar counts queued steps and
                # stalls at each logging sync. Waiting one step behind keeps one step queued.
                if pending is not None:
                    _check_finite(pending, step, ckpt)
                pending = metrics
                step += 1
                window_steps += 1
                if step % t.log_every == 0 or step == target:
                    m = {k: float(v) for k, v in jax.device_get(metrics).items()}
                    _check_finite(m, step, ckpt)
                    rate = window_steps * t.batch_size * t.seq_len / max(
                        time.perf_counter() - window_start, 1e-9)
                    window_start, window_steps = time.perf_counter(), 0
                    bar.set_postfix(loss=f"{m['loss']:.3f}", tok_s=f"{rate:,.0f}")
                    _log(workdir, {"step": step, **m, "tokens_per_s": rate,
                                   "wall_seconds": now()})
                if step % t.eval_every == 0 or step == t.steps:
                    _check_finite(metrics, step, ckpt)
                    last_val = evaluate(setup, state.params, splits.val, t.eval_batches,
                                        progress="validation" if progress else None)
                    bar.write(f"step {step}: val bits/char {last_val:.4f}")
                    _log(workdir, {"step": step, "val_bits_per_char": last_val,
                                   "wall_seconds": now()})
                if step % t.checkpoint_every == 0 or step == target:
                    _check_finite(metrics, step, ckpt)
                    ckpt.save(step, _items(state, now()))
                bar.update(1)
    except KeyboardInterrupt:
        try:
            if pending is not None:
                _check_finite(pending, step, ckpt)
            ckpt.save(int(state.step), _items(state, now()))
            bar.write(f"interrupted: checkpoint at step {int(state.step)}; rerun to resume")
        except Exception:  # noqa: BLE001 - interrupted inside a step: its inputs were donated
            bar.write(f"interrupted mid-step; resume from the last checkpoint (step "
                      f"{ckpt.latest_step()})")
        raise
    finally:
        bar.close()
    return state, now(), last_val


def _final_evaluation(setup: Setup, params, splits, cap: int | None, progress: bool) -> dict:
    """Held-out bits/char of a finished run: val, test (sliding) and test (disjoint)."""
    t = setup.cfg.train
    label = (lambda s: f"final eval: {s}") if progress else (lambda s: None)
    return {
        "bits_per_char_val": evaluate(setup, params, splits.val, cap,
                                      progress=label("validation")),
        "bits_per_char_test": evaluate(setup, params, splits.test, cap, progress=label("test")),
        "bits_per_char_test_nonoverlapping": evaluate(
            setup, params, splits.test, cap, stride=None,
            progress=label("test, disjoint windows")),
        "eval_method": (
            f"bytes of the held-out split scored once each, windows of {t.seq_len}; "
            + (f"sliding stride {t.eval_stride} (>= {t.seq_len - t.eval_stride} bytes of "
               "context after the first window)" if t.eval_stride else "non-overlapping")
            + "; the _nonoverlapping figure uses disjoint windows"
            + (f"; first {cap} batches of each split only" if cap else "")),
    }


def load_params(workdir: str, mesh: Mesh | None = None) -> tuple[Setup, Any]:
    """Loads ``(setup, params)`` from a workdir's newest intact checkpoint onto ``mesh``.

    Only the parameters are read (never the optimizer state), verified against the step's
    integrity manifest; a damaged newest step falls back to an older intact one with a
    warning.

    Raises:
      FileNotFoundError: no workdir or no checkpoint.
      ValueError: a bad ``config.json``; CheckpointCorruptError (a ValueError) when no step
        is intact.
    """
    cfg = load_workdir_config(workdir)
    kind = _read_workdir(workdir).get("kind", "train_state")
    setup = build(cfg, mesh)
    ckpt = Checkpointer(os.path.join(os.path.expanduser(workdir), "checkpoints"),
                        keep=cfg.train.keep_checkpoints, create=False)
    try:
        if ckpt.latest_step() is None:
            raise FileNotFoundError(f"no checkpoint under {ckpt.directory!r}; train first")
        abstract = {"params": setup.abstract_state.params}
        if kind == "params":
            legacy = (abstract, lambda t: t)
        else:  # older runs saved the whole train state as one tree
            full, convert = _abstract_items(setup)[1]
            legacy = (full, lambda t: {"params": convert(t)["params"]})
        params = ckpt.restore(abstract, legacy=legacy)["params"]
    finally:
        ckpt.close()
    return setup, params
