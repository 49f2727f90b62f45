"""Orbax checkpoints with an integrity manifest: atomic saves, verified restores onto an abstract
target (any mesh), fallback to the newest intact step.

A step holds named *items* (e.g. ``params`` and ``train``), each its own orbax sub-directory,
so one item (the parameters) restores without reading the others (the optimizer state).

Integrity: after orbax commits a step, :data:`MANIFEST` records the size and SHA-256 of every
file of every item. A restore verifies the files of the items it reads first; a mismatch (a
flipped bit, a truncated file, a missing file) or a step orbax cannot read is reported naming
the step and the file, and by default the newest intact older step is restored instead, with a
:class:`CheckpointFallbackWarning`. Steps without a manifest (written before manifests, or a
save killed between orbax's commit and the manifest) restore unverified, with a warning.

Order of writes: a new step is committed and its manifest written before any older step is
deleted (orbax's own ``max_to_keep`` is not used: it would delete without the manifest). A step
saved again under the same number is written to a staging directory next to the checkpoint
directory first and swapped in by two renames; a crash between them is repaired the next time
the directory is opened, so the only copy of a step (``keep=1``) is never lost.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import warnings
from collections.abc import Callable, Sequence
from typing import Any

import jax
import orbax.checkpoint as ocp

from ec2moe_jax.files import read_json, write_json_atomic

MANIFEST = "ec2moe_manifest.json"
_LEGACY_ITEM = "default"  # orbax's item name for a single-tree save (checkpoints before items)
_CHUNK = 1 << 20


class CheckpointCorruptError(ValueError):
    """A checkpoint step whose files do not match its manifest or that orbax cannot read."""


class CheckpointFallbackWarning(UserWarning):
    """A damaged or unverifiable step was skipped or restored without verification."""


def _abs(path: str) -> str:
    return os.path.abspath(os.path.expanduser(path))


def _file_digest(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            h.update(chunk)
    return h.hexdigest()


def _item_files(item_dir: str) -> dict[str, dict]:
    """``{relative path: {"bytes", "sha256"}}`` of every file under ``item_dir``."""
    out = {}
    for root, _, files in os.walk(item_dir):
        for name in files:
            full = os.path.join(root, name)
            out[os.path.relpath(full, item_dir)] = {"bytes": os.path.getsize(full),
                                                    "sha256": _file_digest(full)}
    return dict(sorted(out.items()))


def _check_items(items: Any, what: str) -> None:
    if not isinstance(items, dict) or not items or not all(
            isinstance(k, str) and k and k != _LEGACY_ITEM for k in items):
        raise ValueError(f"{what} takes a non-empty dict of item name -> pytree (names other "
                         f"than {_LEGACY_ITEM!r}), got {type(items).__name__}")


class Checkpointer:
    """Numbered steps of named pytrees in ``directory``, verified by a manifest per step.

    Args:
      directory: the checkpoint directory (``~`` expanded).
      keep: how many of the newest steps to keep; older ones are deleted after a new step
        and its manifest are written.
      create: create the directory if missing (False: a missing directory raises
        ``FileNotFoundError`` naming the command that makes one).
    """

    def __init__(self, directory: str, keep: int = 2, create: bool = True):
        if keep < 1:
            raise ValueError(f"checkpoints {keep=} must be >= 1")
        self.directory = _abs(directory)
        self.keep = keep
        self.restored_step: int | None = None  # the step the last restore() returned
        if not create and not os.path.isdir(self.directory):
            raise FileNotFoundError(
                f"checkpoint directory {self.directory!r} does not exist; train first "
                "(`ec2moe train`) or pass --workdir of a trained run"
            )
        os.makedirs(self.directory, exist_ok=True)
        self._finish_swap()
        self.manager = self._manager(self.directory)

    @staticmethod
    def _manager(directory: str) -> ocp.CheckpointManager:
        options = ocp.CheckpointManagerOptions(max_to_keep=None, create=True)
        return ocp.CheckpointManager(directory, options=options)

    @property
    def _staging(self) -> str:
        return self.directory.rstrip(os.sep) + ".replacing"

    def all_steps(self) -> list[int]:
        return sorted(int(s) for s in self.manager.all_steps())

    def latest_step(self) -> int | None:
        steps = self.all_steps()
        return steps[-1] if steps else None

    def _step_dir(self, step: int, root: str | None = None) -> str:
        return os.path.join(root or self.directory, str(step))

    # -- saving ---------------------------------------------------------------------------

    def save(self, step: int, items: dict[str, Any]) -> None:
        """Saves ``items`` (item name -> pytree of arrays) as ``step`` and writes its manifest;
        then deletes the steps beyond the newest ``keep``. A step that exists already is
        replaced without ever being absent (staged, then swapped in)."""
        _check_items(items, "Checkpointer.save")
        step = int(step)
        if step in self.all_steps():
            self._replace(step, items)
        else:
            self._write(self.manager, self.directory, step, items)
        for old in self.all_steps()[:-self.keep]:
            self.manager.delete(old)

    @staticmethod
    def _write(manager: ocp.CheckpointManager, root: str, step: int, items: dict) -> None:
        args = ocp.args.Composite(**{k: ocp.args.StandardSave(v) for k, v in items.items()})
        manager.save(step, args=args, force=True)
        manager.wait_until_finished()
        step_dir = os.path.join(root, str(step))
        manifest = {"format": 1, "step": step, "hash": "sha256",
                    "items": {k: _item_files(os.path.join(step_dir, k)) for k in items}}
        write_json_atomic(os.path.join(step_dir, MANIFEST), manifest)

    def _replace(self, step: int, items: dict) -> None:
        staging = self._staging
        shutil.rmtree(staging, ignore_errors=True)  # a leftover: the live step is intact
        manager = self._manager(staging)
        self._write(manager, staging, step, items)
        manager.close()
        old = os.path.join(staging, f"old-{step}")
        os.replace(self._step_dir(step), old)
        os.replace(self._step_dir(step, staging), self._step_dir(step))
        shutil.rmtree(staging, ignore_errors=True)
        self.manager.reload()

    def _finish_swap(self) -> None:
        """Completes a replacement interrupted between its two renames (see :meth:`save`):
        the staged step if it was complete (it has its manifest), else the old one."""
        staging = self._staging
        if not os.path.isdir(staging):
            return
        for name in os.listdir(staging):
            if not name.startswith("old-"):
                continue
            step = name[4:]
            live = os.path.join(self.directory, step)
            if not os.path.exists(live):
                new = os.path.join(staging, step)
                done = os.path.isfile(os.path.join(new, MANIFEST))
                os.replace(new if done else os.path.join(staging, name), live)
        shutil.rmtree(staging, ignore_errors=True)

    # -- verifying and restoring ----------------------------------------------------------

    def verify(self, step: int, names: Sequence[str] | None = None) -> list[str] | None:
        """Problems of ``step``'s items ``names`` (default: all in its manifest) against its
        manifest: ``[]`` when intact, ``None`` when the step has no manifest (unverifiable)."""
        step_dir = self._step_dir(step)
        path = os.path.join(step_dir, MANIFEST)
        if not os.path.isfile(path):
            return None
        try:
            manifest = read_json(path, what="checkpoint manifest")
            recorded = manifest["items"]
        except (ValueError, KeyError, TypeError) as e:
            return [f"unreadable manifest ({e})"]
        problems = []
        for name in recorded if names is None else names:
            if name not in recorded:
                problems.append(f"item {name!r} is not in this step (it holds "
                                f"{sorted(recorded)})")
                continue
            for rel, want in recorded[name].items():
                full = os.path.join(step_dir, name, rel)
                if not os.path.isfile(full):
                    problems.append(f"{name}/{rel} is missing")
                elif os.path.getsize(full) != want["bytes"]:
                    problems.append(f"{name}/{rel} has {os.path.getsize(full)} bytes, "
                                    f"{want['bytes']} were written (truncated or overwritten)")
                elif _file_digest(full) != want["sha256"]:
                    problems.append(f"{name}/{rel} differs from what was written (SHA-256 "
                                    "mismatch: the bytes changed on disk)")
        return problems

    def _is_legacy(self, step: int) -> bool:
        step_dir = self._step_dir(step)
        return (os.path.isdir(os.path.join(step_dir, _LEGACY_ITEM))
                and not os.path.isfile(os.path.join(step_dir, MANIFEST)))

    def _restore_one(self, step: int, items: dict, legacy) -> dict:
        """Restores ``items`` of one step, or raises CheckpointCorruptError naming it."""
        where = f"checkpoint step {step} in {self.directory!r}"
        if self._is_legacy(step):
            if legacy is None:
                raise CheckpointCorruptError(f"{where} has the single-tree layout of older "
                                             "versions, which this reader cannot map")
            abstract, convert = legacy
            # A manager of its own: orbax fixes a manager to single- or multi-item on use.
            manager = self._manager(self.directory)
            try:
                tree = self._orbax_restore(step, ocp.args.StandardRestore(abstract), where,
                                           manager)
            finally:
                manager.close()
            return convert(tree)
        problems = self.verify(step, list(items))
        if problems:
            raise CheckpointCorruptError(f"{where} is damaged: " + "; ".join(problems[:3])
                                         + (f" (and {len(problems) - 3} more)"
                                            if len(problems) > 3 else ""))
        if problems is None:
            warnings.warn(f"{where} has no integrity manifest (written by an older version, or "
                          "the save was killed before the manifest): restoring it unverified",
                          CheckpointFallbackWarning, stacklevel=3)
        args = ocp.args.Composite(**{k: ocp.args.StandardRestore(v) for k, v in items.items()})
        out = self._orbax_restore(step, args, where)
        return {k: out[k] for k in items}

    def _orbax_restore(self, step: int, args, where: str, manager=None) -> Any:
        try:
            return (manager or self.manager).restore(step, args=args)
        except Exception as e:  # noqa: BLE001 - orbax/TensorStore raise many kinds; name the step
            first = " ".join(str(e).split())[:300] or type(e).__name__
            raise CheckpointCorruptError(f"{where} cannot be read ({type(e).__name__}: "
                                         f"{first})") from e

    def restore(self, items: dict[str, Any], step: int | None = None, *, fallback: bool = True,
                legacy: tuple[Any, Callable[[Any], dict]] | None = None) -> dict[str, Any]:
        """Restores ``items`` (item name -> abstract pytree) of ``step`` (default: the newest
        intact one), verified against the step's manifest first.

        Args:
          items: item name -> pytree of ``jax.ShapeDtypeStruct`` (with ``sharding``), e.g.
            from ``jax.eval_shape``; restoring onto a different mesh is a different target.
            Only these items are read: restoring ``params`` never touches ``train``.
          step: a specific step (no fallback), or None for the newest.
          fallback: with ``step=None``, skip damaged steps (each with a
            :class:`CheckpointFallbackWarning`) and restore the newest intact one.
          legacy: ``(abstract tree, convert)`` for steps in the single-tree layout of older
            versions: the tree is restored and ``convert(tree)`` returns the items.

        Returns:
          ``{name: restored pytree}``; ``self.restored_step`` says which step.

        Raises:
          FileNotFoundError: the directory holds no step.
          CheckpointCorruptError: the step (or, with fallback, every step) is damaged; the
            message names each step and what is wrong.
        """
        _check_items(items, "Checkpointer.restore")
        steps = self.all_steps()
        if not steps:
            raise FileNotFoundError(f"no checkpoint in {self.directory!r}")
        if step is not None and step not in steps:
            raise FileNotFoundError(f"no checkpoint step {step} in {self.directory!r} (steps: "
                                    f"{steps})")
        order = [step] if step is not None else sorted(steps, reverse=True)
        if not fallback:
            order = order[:1]
        errors = []
        for s in order:
            try:
                out = self._restore_one(s, items, legacy)
            except CheckpointCorruptError as e:
                errors.append(str(e))
                if s != order[-1]:
                    warnings.warn(f"{e}; falling back to an older step",
                                  CheckpointFallbackWarning, stacklevel=2)
                continue
            self.restored_step = s
            return out
        raise CheckpointCorruptError("no intact checkpoint to restore: " + " | ".join(errors)
                                     + "; retrain, or restore the directory from a backup")

    def quarantine(self, step: int) -> str:
        """Moves a damaged ``step`` out of the checkpoint directory (into ``<dir>.damaged``,
        kept for inspection, never restored); returns where it went."""
        dest_root = self.directory.rstrip(os.sep) + ".damaged"
        os.makedirs(dest_root, exist_ok=True)
        dest, n = os.path.join(dest_root, str(step)), 1
        while os.path.exists(dest):
            dest, n = os.path.join(dest_root, f"{step}.{n}"), n + 1
        os.replace(self._step_dir(step), dest)
        self.manager.reload()
        return dest

    def close(self) -> None:
        self.manager.close()


def save_tree(directory: str, tree: Any, step: int = 0) -> None:
    """Saves one pytree as the only checkpoint of ``directory`` (atomically; a previous one is
    deleted only after this one is complete)."""
    ckpt = Checkpointer(directory, keep=1)
    ckpt.save(step, {"tree": tree})
    ckpt.close()


def restore_tree(directory: str, abstract_tree: Any) -> Any:
    """Restores the newest intact checkpoint of ``directory`` onto ``abstract_tree`` (see
    :meth:`Checkpointer.restore`).

    Raises:
      FileNotFoundError: no checkpoint there.
      CheckpointCorruptError: none is intact.
    """
    ckpt = Checkpointer(directory, create=False)
    try:
        return ckpt.restore({"tree": abstract_tree},
                            legacy=(abstract_tree, lambda t: {"tree": t}))["tree"]
    finally:
        ckpt.close()


def abstract_with_shardings(tree: Any, shardings: Any) -> Any:
    """ShapeDtypeStructs of ``tree`` carrying ``shardings`` (a matching tree)."""
    return jax.tree.map(
        lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), tree, shardings
    )
