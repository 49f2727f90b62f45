"""Batches for training (random windows) and evaluation (every token exactly once).

Training batches are a pure function of ``(seed, step)``: there is no iterator state to save, so
a run resumed from a checkpoint at step ``s`` sees exactly the batches an uninterrupted run
would have seen from step ``s`` on.
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np


def _check_tokens(tokens: np.ndarray, batch_size: int, seq_len: int) -> np.ndarray:
    """Validates the shared arguments and returns ``tokens`` as a 1-D array."""
    tokens = np.asarray(tokens)
    if tokens.ndim != 1:
        raise ValueError(f"tokens must be 1-D, got shape {tokens.shape}")
    if batch_size < 1 or seq_len < 1:
        raise ValueError(f"batch_size={batch_size} and seq_len={seq_len} must be >= 1")
    return tokens


def train_batch(
    tokens: np.ndarray, step: int, *, batch_size: int, seq_len: int, seed: int
) -> dict[str, np.ndarray]:
    """Draws ``batch_size`` random windows of the split for training step ``step``.

    Args:
        tokens: 1-D token ids of the training split.
        step: the optimiser step (>= 0); together with ``seed`` it fully determines the batch.
        batch_size: B, windows per batch.
        seq_len: T, tokens per window.
        seed: the run's data seed (>= 0).

    Returns:
        ``{"inputs": int32 [B, T], "targets": int32 [B, T]}`` where each row of ``targets`` is
        the matching row of ``inputs`` shifted left by one token (next-token prediction).

    Raises:
        ValueError: the split has fewer than ``seq_len + 1`` tokens, or a bad argument.
    """
    tokens = _check_tokens(tokens, batch_size, seq_len)
    if step < 0 or seed < 0:
        raise ValueError(f"step={step} and seed={seed} must be >= 0")
    n = tokens.shape[0]
    if n < seq_len + 1:
        raise ValueError(
            f"split has {n} tokens, but seq_len={seq_len} needs at least {seq_len + 1} "
            "(inputs plus one target); use a shorter seq_len or more text"
        )
    # Seeding from the pair (not a generator advanced step by step) is what makes the batch
    # independent of how many batches were drawn before it.
    rng = np.random.default_rng([seed, step])
    starts = rng.integers(0, n - seq_len, size=batch_size)  # high is exclusive: <= n-T-1
    windows = tokens[starts[:, None] + np.arange(seq_len + 1)].astype(np.int32)
    return {"inputs": windows[:, :-1], "targets": windows[:, 1:]}


def num_eval_batches(tokens: np.ndarray, batch_size: int, seq_len: int) -> int:
    """Returns how many batches :func:`eval_batches` yields with ``max_batches=None``.

    Args:
        tokens: 1-D token ids of the split.
        batch_size: B.
        seq_len: T.

    Returns:
        ``ceil(ceil((len(tokens) - 1) / T) / B)``: windows cover the ``len - 1`` predicted
        tokens, T at a time, and batches hold B windows (0 for a split with < 2 tokens).
    """
    tokens = _check_tokens(tokens, batch_size, seq_len)
    predicted = max(tokens.shape[0] - 1, 0)
    windows = -(-predicted // seq_len)
    return -(-windows // batch_size)


def eval_batches(
    tokens: np.ndarray, *, batch_size: int, seq_len: int, max_batches: int | None = None
) -> Iterator[dict[str, np.ndarray]]:
    """Iterates over non-overlapping windows that cover the split from its start.

    Window ``i`` has inputs ``tokens[i*T : i*T+T]`` and targets ``tokens[i*T+1 : i*T+T+1]``, so
    every token but the first is a target exactly once. The last window and the last batch are
    padded (id 0) to fixed shapes, which keeps one compiled eval step for every batch.

    Args:
        tokens: 1-D token ids of the split (at least 2).
        batch_size: B, windows per batch.
        seq_len: T, tokens per window.
        max_batches: stop after this many batches (a cheap periodic estimate); None = all.

    Returns:
        An iterator of ``{"inputs": int32 [B, T], "targets": int32 [B, T], "mask": float32
        [B, T]}``; ``mask`` is 1 where the target is a real token and 0 on padding, so over all
        batches ``mask.sum() == len(tokens) - 1``.

    Raises:
        ValueError: fewer than 2 tokens, or a bad argument (raised at call time, not lazily).
    """
    tokens = _check_tokens(tokens, batch_size, seq_len)
    n = tokens.shape[0]
    if n < 2:
        raise ValueError(f"split has {n} token(s); evaluation needs at least 2")
    if max_batches is not None and max_batches < 0:
        raise ValueError(f"max_batches={max_batches} must be >= 0 or None")
    total = num_eval_batches(tokens, batch_size, seq_len)
    count = total if max_batches is None else min(total, max_batches)
    return _eval_iter(tokens, batch_size, seq_len, count)


def _eval_iter(
    tokens: np.ndarray, batch_size: int, seq_len: int, count: int
) -> Iterator[dict[str, np.ndarray]]:
    """Yields the first ``count`` eval batches (see :func:`eval_batches`)."""
    n = tokens.shape[0]
    num_windows = -(-(n - 1) // seq_len)
    offsets = np.arange(seq_len + 1)
    for b in range(count):
        rows = np.arange(b * batch_size, (b + 1) * batch_size)
        idx = rows[:, None] * seq_len + offsets  # [B, T+1] positions in the split
        # Rows past the last window are pure padding (inputs too, so they carry no stray token).
        valid = (idx < n) & (rows < num_windows)[:, None]
        windows = np.where(valid, tokens[np.minimum(idx, n - 1)], 0).astype(np.int32)
        yield {
            "inputs": windows[:, :-1],
            "targets": windows[:, 1:],
            "mask": valid[:, 1:].astype(np.float32),
        }
