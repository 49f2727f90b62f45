"""Contiguous train/val/test splits, per work, cut on line boundaries.

Random line-level splits leak: neighbouring lines of a speech (or repeated refrains) would land
in both train and test and inflate held-out scores. So each work is cut into three contiguous
slices - the first ``1 - val - test`` for training, the next ``val`` for validation, the last
``test`` for testing - and each cut is moved forward to the next line start, so no line is split.

A work too short to give every split at least one non-blank line is kept entirely in train
with a ``UserWarning`` (we do not raise: one tiny file should not stop a run). If that leaves
validation or test empty for the whole corpus, :func:`split_works` raises ``ValueError``.
"""

from __future__ import annotations

import dataclasses
import warnings
from collections.abc import Sequence

import numpy as np

from ec2moe_jax.config import DataConfig
from ec2moe_jax.data.corpus import Work, load_corpus
from ec2moe_jax.data.tokenizer import ByteTokenizer

SPLIT_NAMES = ("train", "val", "test")
# Joins the pieces of different works inside one split, so a window crossing from one work to
# the next sees a paragraph break rather than two texts glued mid-line.
WORK_SEPARATOR = "\n\n"

Span = tuple[str, int, int]


@dataclasses.dataclass
class Splits:
    """Token arrays of the three splits and where each piece came from.

    Attributes:
        train, val, test: 1-D int32 token arrays; each is the split's pieces (in corpus order)
            joined by ``WORK_SEPARATOR`` and tokenized.
        spans: for each split name, one ``(work name, start, end)`` per piece: the piece is
            ``work.text[start:end]`` (character offsets into the original work text).
    """

    train: np.ndarray
    val: np.ndarray
    test: np.ndarray
    spans: dict[str, list[Span]]

    def summary(self) -> dict[str, int]:
        """Returns sizes: ``<split>_tokens``, ``<split>_chars`` (work text only, without
        separators), ``<split>_pieces`` for each split, and ``works``."""
        out: dict[str, int] = {}
        for name in SPLIT_NAMES:
            spans = self.spans[name]
            out[f"{name}_tokens"] = int(getattr(self, name).size)
            out[f"{name}_chars"] = sum(end - start for _, start, end in spans)
            out[f"{name}_pieces"] = len(spans)
        out["works"] = len({w for spans in self.spans.values() for w, _, _ in spans})
        return out


def _next_line_start(text: str, pos: int) -> int:
    """Returns the first line start at or after ``pos`` (0 and len(text) count as line starts)."""
    if pos <= 0:
        return 0
    if pos >= len(text) or text[pos - 1] == "\n":
        return min(pos, len(text))
    nl = text.find("\n", pos)
    return len(text) if nl < 0 else nl + 1


def _cut_points(text: str, val_fraction: float, test_fraction: float) -> tuple[int, int] | None:
    """Returns (train end, val end) character offsets, or None if a piece would have no line."""
    n = len(text)
    c1 = _next_line_start(text, round(n * (1.0 - val_fraction - test_fraction)))
    c2 = _next_line_start(text, max(c1, round(n * (1.0 - test_fraction))))
    pieces = (text[:c1], text[c1:c2], text[c2:])
    # A piece made only of blank lines carries nothing to learn or score.
    if any(not p.strip() for p in pieces):
        return None
    return c1, c2


def split_works(
    works: Sequence[Work],
    val_fraction: float,
    test_fraction: float,
    tokenizer: ByteTokenizer | None = None,
) -> Splits:
    """Splits every work contiguously into train/val/test and tokenizes each split.

    Args:
        works: the corpus; names must be unique (spans refer to works by name).
        val_fraction: share of each work (in characters, before snapping) for validation.
        test_fraction: share of each work for testing (the end of the work).
        tokenizer: turns the joined text of a split into ids; default :class:`ByteTokenizer`.

    Returns:
        The :class:`Splits`. A work too short for three non-blank pieces is kept wholly in
        train (with a ``UserWarning`` naming it).

    Raises:
        ValueError: no works, duplicate names, fractions outside ``0 < f`` with
            ``val + test < 1``, or no work long enough to give validation and test any text.
    """
    if not works:
        raise ValueError("split_works needs at least one work")
    if not (val_fraction > 0 and test_fraction > 0 and val_fraction + test_fraction < 1):
        raise ValueError(
            f"val_fraction={val_fraction} and test_fraction={test_fraction} must be > 0 "
            "and sum to less than 1"
        )
    names = [w.name for w in works]
    dupes = sorted({n for n in names if names.count(n) > 1})
    if dupes:
        raise ValueError(f"work names must be unique; repeated: {dupes}")
    tokenizer = tokenizer or ByteTokenizer()
    texts: dict[str, list[str]] = {name: [] for name in SPLIT_NAMES}
    spans: dict[str, list[Span]] = {name: [] for name in SPLIT_NAMES}
    for work in works:
        cuts = _cut_points(work.text, val_fraction, test_fraction)
        if cuts is None:
            warnings.warn(
                f"work {work.name!r} ({len(work.text)} chars) is too short to give train, val "
                "and test a line each; keeping all of it in train",
                UserWarning,
                stacklevel=2,
            )
            bounds = {"train": (0, len(work.text))}
        else:
            c1, c2 = cuts
            bounds = {"train": (0, c1), "val": (c1, c2), "test": (c2, len(work.text))}
        for split, (start, end) in bounds.items():
            texts[split].append(work.text[start:end])
            spans[split].append((work.name, start, end))
    for split in ("val", "test"):
        if not spans[split]:
            raise ValueError(
                f"no work is long enough to give the {split} split any text "
                f"({len(works)} work(s), longest {max(len(w.text) for w in works)} chars); "
                "add text or lower val_fraction/test_fraction"
            )
    arrays = {s: tokenizer.encode(WORK_SEPARATOR.join(texts[s])) for s in SPLIT_NAMES}
    return Splits(train=arrays["train"], val=arrays["val"], test=arrays["test"], spans=spans)


def prepare_splits(cfg: DataConfig) -> Splits:
    """Loads the corpus named by ``cfg`` and splits it.

    Args:
        cfg: data config (validated here, so bad fractions fail before any download).

    Returns:
        The byte-tokenized :class:`Splits`.
    """
    cfg.validate()
    works = load_corpus(cfg)
    return split_works(works, cfg.val_fraction, cfg.test_fraction, ByteTokenizer())
