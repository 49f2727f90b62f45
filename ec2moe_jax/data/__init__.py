"""Data layer: corpus loading and cleaning, byte tokenizer, contiguous splits, batches.

Pure numpy (no JAX), so it can be tested and run anywhere; the training loop turns the numpy
batches into device arrays itself.
"""

from ec2moe_jax.data.batches import eval_batches, num_eval_batches, train_batch
from ec2moe_jax.data.corpus import (
    Work,
    clean_play_markdown,
    fetch_shakespeare,
    load_corpus,
    load_text_files,
)
from ec2moe_jax.data.splits import Splits, prepare_splits, split_works
from ec2moe_jax.data.tokenizer import ByteTokenizer

__all__ = [
    "ByteTokenizer",
    "Splits",
    "Work",
    "clean_play_markdown",
    "eval_batches",
    "fetch_shakespeare",
    "load_corpus",
    "load_text_files",
    "num_eval_batches",
    "prepare_splits",
    "split_works",
    "train_batch",
]
