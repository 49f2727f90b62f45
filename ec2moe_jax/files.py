"""Reading and writing the project's own files: atomic writes, and JSON reads that name the file.

Every file the project writes (results, run metadata, routing statistics, converted weights) goes
through :func:`atomic_write`: a temporary file in the same directory, flushed and renamed over the
target, so a reader (or a run killed mid-write) never sees half a file. Every JSON the project
reads back goes through :func:`read_json`, whose errors name the file and the command that writes
it, never a bare ``JSONDecodeError``.
"""

from __future__ import annotations

import contextlib
import json
import os
from collections.abc import Iterator
from typing import IO, Any


def _abs(path: str | os.PathLike) -> str:
    return os.path.abspath(os.path.expanduser(os.fspath(path)))


@contextlib.contextmanager
def atomic_write(path: str | os.PathLike, mode: str = "w") -> Iterator[IO]:
    """Opens a temporary sibling of ``path`` for writing and renames it over ``path`` on success.

    On an exception the temporary file is removed and ``path`` keeps its old content.

    Args:
      path: the target file; its directory is created if missing.
      mode: "w" (text) or "wb" (bytes).
    """
    if mode not in ("w", "wb"):
        raise ValueError(f"atomic_write mode={mode!r} must be 'w' or 'wb'")
    target = _abs(path)
    os.makedirs(os.path.dirname(target), exist_ok=True)
    root, ext = os.path.splitext(target)
    tmp = f"{root}.tmp.{os.getpid()}{ext}"  # keeps the extension (numpy adds .npz otherwise)
    try:
        with open(tmp, mode) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, target)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def write_json_atomic(path: str | os.PathLike, obj: Any, *, indent: int = 2) -> None:
    """Writes ``obj`` as JSON (plus a final newline) to ``path`` atomically."""
    with atomic_write(path) as f:
        json.dump(obj, f, indent=indent)
        f.write("\n")


def write_text_atomic(path: str | os.PathLike, text: str) -> None:
    """Writes ``text`` to ``path`` atomically."""
    with atomic_write(path) as f:
        f.write(text)


def read_json(path: str | os.PathLike, *, what: str = "JSON file", command: str | None = None
              ) -> Any:
    """Reads a JSON file the project (or a user) wrote.

    Args:
      path: the file.
      what: what the file is, for messages ("the codec sweep", "a plan JSON").
      command: the command that writes it, suggested when it is missing or unreadable.

    Raises:
      FileNotFoundError: ``path`` does not exist (the message names ``command``).
      ValueError: the file is not valid JSON (the message names the file, line and column).
    """
    hint = f"; `{command}` writes it" if command else ""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{what} {path!r} not found{hint}")
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except json.JSONDecodeError as e:
        raise ValueError(f"{what} {path!r} is not valid JSON (line {e.lineno}, column "
                         f"{e.colno}: {e.msg}){hint}") from None
    except UnicodeDecodeError as e:
        raise ValueError(f"{what} {path!r} is not UTF-8 text ({e.reason} at byte {e.start})"
                         f"{hint}") from None
