"""Orbax checkpoints: atomic saves, restore onto an abstract target (any mesh)."""

from __future__ import annotations

import os
from typing import Any

import jax
import orbax.checkpoint as ocp


def _abs(path: str) -> str:
    return os.path.abspath(os.path.expanduser(path))


class Checkpointer:
    """A thin wrapper over ``ocp.CheckpointManager`` for one pytree per step.

    Orbax writes each step into a temporary directory and renames it when complete, so an
    interrupted save never leaves a half-written checkpoint behind.
    """

    def __init__(self, directory: str, keep: int = 2, create: bool = True):
        self.directory = _abs(directory)
        if not create and not os.path.isdir(self.directory):
            raise FileNotFoundError(
                f"checkpoint directory {self.directory!r} does not exist; train first "
                "(`ec2moe train`) or pass --workdir of a trained run"
            )
        options = ocp.CheckpointManagerOptions(max_to_keep=keep, create=create)
        self.manager = ocp.CheckpointManager(self.directory, options=options)

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def save(self, step: int, tree: Any, force: bool = True) -> None:
        """Saves ``tree`` as ``step``; a step that already exists is replaced."""
        if step in self.manager.all_steps():
            self.manager.delete(step)
        self.manager.save(step, args=ocp.args.StandardSave(tree), force=force)
        self.manager.wait_until_finished()

    def restore(self, abstract_tree: Any, step: int | None = None) -> Any:
        """Restores ``step`` (default: latest) with the shapes/dtypes/shardings of the target.

        Args:
          abstract_tree: a pytree of ``jax.ShapeDtypeStruct`` (with ``sharding``), e.g. from
            ``jax.eval_shape``; restoring onto a different mesh is a different target.
        """
        step = self.latest_step() if step is None else step
        if step is None:
            raise FileNotFoundError(f"no checkpoint in {self.directory!r}")
        return self.manager.restore(step, args=ocp.args.StandardRestore(abstract_tree))

    def close(self) -> None:
        self.manager.close()


def save_tree(directory: str, tree: Any, step: int = 0) -> None:
    """Saves one pytree as the only checkpoint of ``directory`` (atomically)."""
    ckpt = Checkpointer(directory, keep=1)
    ckpt.save(step, tree)
    ckpt.close()


def restore_tree(directory: str, abstract_tree: Any) -> Any:
    """Restores the latest checkpoint of ``directory`` onto ``abstract_tree`` (see
    :meth:`Checkpointer.restore`)."""
    ckpt = Checkpointer(directory, create=False)
    out = ckpt.restore(abstract_tree)
    ckpt.close()
    return out


def abstract_with_shardings(tree: Any, shardings: Any) -> Any:
    """ShapeDtypeStructs of ``tree`` carrying ``shardings`` (a matching tree)."""
    return jax.tree.map(
        lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), tree, shardings
    )


