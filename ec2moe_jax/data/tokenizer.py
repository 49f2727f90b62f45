"""Byte-level tokenizer: every UTF-8 byte is one token, so there is nothing to train or download.

A byte vocabulary keeps the model's embedding table tiny (256 rows) and can represent any text,
including the few non-ASCII characters of the corpus, at the cost of longer sequences.
"""

from __future__ import annotations

from typing import Any

import numpy as np


class ByteTokenizer:
    """Maps text to its UTF-8 bytes (ids 0..255) and back."""

    vocab_size: int = 256

    def encode(self, text: str) -> np.ndarray:
        """Encodes ``text`` as its UTF-8 bytes.

        Args:
            text: any Python string.

        Returns:
            A 1-D int32 array with one id in 0..255 per UTF-8 byte (int32 rather than uint8 because
            the model's embedding lookup and loss expect a signed integer dtype).
        """
        if not isinstance(text, str):
            raise TypeError(f"encode expects str, got {type(text).__name__}")
        return np.frombuffer(text.encode("utf-8"), dtype=np.uint8).astype(np.int32)

    def decode(self, ids: Any) -> str:
        """Decodes token ids back to text.

        Args:
            ids: a sequence or array of integer ids in 0..255 (any shape; it is flattened).

        Returns:
            The decoded string. Byte sequences that are not valid UTF-8 (e.g. a sampled sequence
            cut mid-character) become U+FFFD rather than raising, because generated text must
            always be printable.

        Raises:
            ValueError: an id lies outside 0..255 or the ids are not integers. Clipping would
                silently hide a vocabulary mismatch between model and tokenizer, so we refuse.
        """
        arr = np.asarray(ids).reshape(-1)
        if arr.size == 0:
            return ""
        if not np.issubdtype(arr.dtype, np.integer):
            raise ValueError(f"token ids must be integers, got dtype {arr.dtype}")
        bad = np.flatnonzero((arr < 0) | (arr >= self.vocab_size))
        if bad.size:
            pos = int(bad[0])
            raise ValueError(
                f"token id {int(arr[pos])} at position {pos} is outside the byte vocabulary "
                f"0..{self.vocab_size - 1} ({bad.size} bad id(s) in total)"
            )
        return arr.astype(np.uint8).tobytes().decode("utf-8", errors="replace")
