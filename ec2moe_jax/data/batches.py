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


def _num_windows(n: int, seq_len: int, stride: int) -> int:
    """Windows needed so that the ``n - 1`` targets are all covered (0 for ``n < 2``)."""
    predicted = max(n - 1, 0)
    if predicted == 0:
        return 0
    return 1 + max(0, -(-(predicted - seq_len) // stride))


def _check_stride(seq_len: int, stride: int | None) -> int:
    stride = seq_len if stride is None else stride
    if not 1 <= stride <= seq_len:
        raise ValueError(f"stride={stride} must lie in [1, seq_len={seq_len}]")
    return stride


def num_eval_batches(
    tokens: np.ndarray, batch_size: int, seq_len: int, stride: int | None = None
) -> int:
    """Returns how many batches :func:`eval_batches` yields with ``max_batches=None``.

    Args:
        tokens: 1-D token ids of the split.
        batch_size: B.
        seq_len: T.
        stride: tokens between window starts (default T: non-overlapping windows).

    Returns:
        ``ceil(windows / B)``, where the windows (one every ``stride`` tokens) cover the
        ``len - 1`` predicted tokens (0 for a split with < 2 tokens).
    """
    tokens = _check_tokens(tokens, batch_size, seq_len)
    windows = _num_windows(tokens.shape[0], seq_len, _check_stride(seq_len, stride))
    return -(-windows // batch_size)


def eval_batches(
    tokens: np.ndarray,
    *,
    batch_size: int,
    seq_len: int,
    max_batches: int | None = None,
    stride: int | None = None,
) -> Iterator[dict[str, np.ndarray]]:
    """Iterates over windows that cover the split from its start, each target counted once.

    Window ``i`` starts at ``p = i * stride``: inputs ``tokens[p : p+T]``, targets
    ``tokens[p+1 : p+T+1]``. With the default ``stride = T`` windows do not overlap and the
    first targets of each window see little context. With ``stride < T`` (sliding-window
    evaluation) window ``i > 0`` scores only its last ``stride`` targets, so every target
    after the first window is predicted from at least ``T - stride`` tokens of context. The
    last window and the last batch are padded (id 0) to fixed shapes, which keeps one
    compiled eval step for every batch.

    Args:
        tokens: 1-D token ids of the split (at least 2).
        batch_size: B, windows per batch.
        seq_len: T, tokens per window.
        max_batches: stop after this many batches (a cheap periodic estimate); None = all.
        stride: tokens between window starts, in ``[1, T]``; None = T.

    Returns:
        An iterator of ``{"inputs": int32 [B, T], "targets": int32 [B, T], "mask": float32
        [B, T]}``; ``mask`` is 1 where the target is a real token scored by this window, so
        over all batches ``mask.sum() == len(tokens) - 1``.

    Raises:
        ValueError: fewer than 2 tokens, or a bad argument (raised at call time, not lazily).
    """
    tokens = _check_tokens(tokens, batch_size, seq_len)
    stride = _check_stride(seq_len, stride)
    n = tokens.shape[0]
    if n < 2:
        raise ValueError(f"split has {n} token(s); evaluation needs at least 2")
    if max_batches is not None and max_batches < 0:
        raise ValueError(f"max_batches={max_batches} must be >= 0 or None")
    total = num_eval_batches(tokens, batch_size, seq_len, stride)
    count = total if max_batches is None else min(total, max_batches)
    return _eval_iter(tokens, batch_size, seq_len, stride, count)


def _eval_iter(
    tokens: np.ndarray, batch_size: int, seq_len: int, stride: int, count: int
) -> Iterator[dict[str, np.ndarray]]:
    """Yields the first ``count`` eval batches (see :func:`eval_batches`)."""
    n = tokens.shape[0]
    num_windows = _num_windows(n, seq_len, stride)
    offsets = np.arange(seq_len + 1)
    # Targets j < T - stride of window i > 0 were already scored by window i - 1.
    fresh = np.arange(seq_len) >= seq_len - stride
    for b in range(count):
        rows = np.arange(b * batch_size, (b + 1) * batch_size)
        idx = rows[:, None] * stride + offsets  # [B, T+1] positions in the split
        # Rows past the last window are pure padding (inputs too, so they carry no stray token).
        valid = (idx < n) & (rows < num_windows)[:, None]
        windows = np.where(valid, tokens[np.minimum(idx, n - 1)], 0).astype(np.int32)
        scored = valid[:, 1:] & (fresh[None, :] | (rows == 0)[:, None])
        yield {
            "inputs": windows[:, :-1],
            "targets": windows[:, 1:],
            "mask": scored.astype(np.float32),
        }
