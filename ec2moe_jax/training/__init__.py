"""Training: optax steps, orbax checkpoints, the resumable LM loop."""

from ec2moe_jax.files import write_json_atomic
from ec2moe_jax.training.checkpoint import Checkpointer, abstract_with_shardings
from ec2moe_jax.training.loop import (
    Setup,
    build,
    evaluate,
    load_params,
    load_workdir_config,
    save_params,
    train,
)
from ec2moe_jax.training.steps import (
    TrainState,
    make_eval_step,
    make_optimizer,
    make_train_step,
    token_nll,
)
from ec2moe_jax.training.workdir import calibration_window, collect_stats, load_run

__all__ = [
    "Checkpointer",
    "Setup",
    "TrainState",
    "abstract_with_shardings",
    "build",
    "calibration_window",
    "collect_stats",
    "evaluate",
    "load_params",
    "load_run",
    "load_workdir_config",
    "make_eval_step",
    "make_optimizer",
    "make_train_step",
    "save_params",
    "token_nll",
    "train",
    "write_json_atomic",
]
