"""A trained run as the rest of the project uses it: parameters, data splits and the routing
statistics of the full model (collected once, cached in the workdir).

Shape legend: M MoE layers, E experts, B batch, T time.
"""

from __future__ import annotations

import hashlib
import os
import sys

import jax
import numpy as np
from tqdm.auto import tqdm

from ec2moe_jax import data as data_lib
from ec2moe_jax.models import MoELM, routing_stats
from ec2moe_jax.routing import RoutingStats, load_stats, save_stats
from ec2moe_jax.training.loop import load_params

STATS_FILE = "routing_stats.npz"
DEFAULT_WINDOW = 128  # bytes per window of the calibration passes (stats, gates, codecs)


def calibration_window(model: MoELM, seq_len: int | None = None) -> int:
    """Tokens per window of a calibration pass: ``seq_len``, or 128 capped by the model's
    ``max_seq_len`` (a ``tiny`` model takes 64).

    Raises:
      ValueError: ``seq_len`` is below 1 or above the model's ``max_seq_len``.
    """
    limit = model.cfg.max_seq_len
    if seq_len is None:
        return min(DEFAULT_WINDOW, limit)
    if not 1 <= seq_len <= limit:
        raise ValueError(f"window {seq_len=} must lie in [1, max_seq_len={limit}] of the model")
    return seq_len


def collect_stats(model: MoELM, params, tokens: np.ndarray, *, batches: int = 32,
                  batch_size: int = 16, seq_len: int | None = None, seed: int = 7,
                  progress: bool = False) -> RoutingStats:
    """Routing statistics of the full model over ``batches`` random training windows.

    Args:
      tokens: <int>[N] training token ids.
      seq_len: window length (default :func:`calibration_window`).
      progress: show a progress bar.

    Returns:
      The summed :class:`~ec2moe_jax.routing.RoutingStats` (counts [M, E], co-activation
      [M, E, E], tokens).
    """
    seq_len = calibration_window(model, seq_len)
    fn = jax.jit(lambda p, t: routing_stats(model, p, t))
    total = None
    for i in tqdm(range(batches), desc="routing statistics", unit="batch", disable=not progress,
                  leave=False):
        batch = data_lib.train_batch(tokens, i, batch_size=batch_size, seq_len=seq_len,
                                     seed=seed)
        s = fn(params, batch["inputs"])
        total = s if total is None else total + s
    return total


def load_run(workdir: str, *, progress: bool = True):
    """A trained workdir as ``(setup, params, splits, frequencies)``.

    ``frequencies`` is <float>[M, E], each MoE layer's routing frequency per expert, from
    statistics collected once over training windows and cached as
    ``<workdir>/routing_stats.npz`` (the first call takes minutes on CPU; it says so).

    Raises:
      FileNotFoundError: ``workdir`` holds no trained model.
    """
    setup, params = load_params(workdir)
    splits = data_lib.prepare_splits(setup.cfg.data)
    path = os.path.join(os.path.expanduser(workdir), STATS_FILE)
    if os.path.exists(path):
        stats = load_stats(path)
    else:
        if progress:
            print(f"collecting routing statistics of {workdir} (once; cached in {path})",
                  file=sys.stderr, flush=True)
        stats = collect_stats(setup.model, params, splits.train, progress=progress)
        save_stats(stats, path)
    return setup, params, splits, np.asarray(stats.frequencies)


def params_fingerprint(params) -> str:
    """The identity of a set of parameters: SHA-256 over every array's path, dtype, shape and
    bytes, in a fixed order (the host copy; any sharding). Two processes that loaded the same
    checkpoint agree on it; any changed bit changes it. The serving protocol refuses a session
    whose end runs other parameters than the cloud (:mod:`ec2moe_jax.serving`).

    Returns:
      ``"sha256:<32 hex digits>"``.
    """
    digest = hashlib.sha256()
    leaves, _ = jax.tree_util.tree_flatten_with_path(params)
    for path, leaf in sorted(leaves, key=lambda kv: jax.tree_util.keystr(kv[0])):
        a = np.ascontiguousarray(jax.device_get(leaf))
        digest.update(f"{jax.tree_util.keystr(path)}|{a.dtype}|{a.shape}|".encode())
        digest.update(a.tobytes())
    return "sha256:" + digest.hexdigest()[:32]
