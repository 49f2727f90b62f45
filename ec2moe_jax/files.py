"""Reading and writing the project's own files: atomic writes, and JSON reads that name the file.

Every file the project writes (results, run metadata, routing statistics, converted weights) goes
through :func:`atomic_write`: a temporary file in the same directory, flushed and renamed over the
target, so a reader (or a run killed mid-write) never sees half a file. Every JSON the project
reads back goes through :func:`read_json`, whose errors name the file and the command that writes
it, never a bare ``JSONDecodeError``. JSON is strict both ways: NaN and infinities are refused
when writing (naming the field) and when reading (they are not JSON). JSON-lines logs
(``metrics.jsonl``) are appended one record per line with :func:`append_jsonl` and read with
:func:`read_jsonl`, which skips a half-written last line (a killed run) with a warning.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import warnings
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


def _non_finite(obj: Any, where: str = "") -> str | None:
    """The first field of ``obj`` holding NaN or an infinity ("curve[3].val"), else None."""
    if isinstance(obj, float) and not math.isfinite(obj):
        return where or "the top-level value"
    if isinstance(obj, dict):
        items = ((f"{where}.{k}" if where else str(k), v) for k, v in obj.items())
    elif isinstance(obj, list | tuple):
        items = ((f"{where}[{i}]", v) for i, v in enumerate(obj))
    else:
        return None
    return next((bad for k, v in items if (bad := _non_finite(v, k)) is not None), None)


def to_json(obj: Any, path: str | os.PathLike, *, indent: int | None = None) -> str:
    """``obj`` as strict JSON text.

    Raises:
      ValueError: ``obj`` holds NaN or an infinity, which JSON cannot represent (the message
        names the field and ``path``, the file it was meant for).
    """
    bad = _non_finite(obj)
    if bad is not None:
        raise ValueError(f"refusing to write {os.fspath(path)!r}: field {bad} is not a finite "
                         "number (NaN and infinity are not JSON)")
    return json.dumps(obj, indent=indent, allow_nan=False)


def write_json_atomic(path: str | os.PathLike, obj: Any, *, indent: int = 2) -> None:
    """Writes ``obj`` as strict JSON (plus a final newline) to ``path`` atomically.

    Raises:
      ValueError: ``obj`` holds NaN or an infinity (see :func:`to_json`); ``path`` keeps its
        old content.
    """
    text = to_json(obj, path, indent=indent)
    with atomic_write(path) as f:
        f.write(text + "\n")


def append_jsonl(path: str | os.PathLike, record: Any) -> None:
    """Appends ``record`` as one strict JSON line to ``path`` (a JSON-lines log), flushed.

    One ``write`` call per record, so a run killed mid-write leaves at most a half-written
    last line, which :func:`read_jsonl` skips and :func:`repair_jsonl` removes.

    Raises:
      ValueError: ``record`` holds NaN or an infinity (the message names the field).
    """
    line = to_json(record, path) + "\n"
    with open(path, "a", encoding="utf-8") as f:
        f.write(line)
        f.flush()


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
            return json.load(f, parse_constant=_reject_constant)
    except json.JSONDecodeError as e:
        raise ValueError(f"{what} {path!r} is not valid JSON (line {e.lineno}, column "
                         f"{e.colno}: {e.msg}){hint}") from None
    except UnicodeDecodeError as e:
        raise ValueError(f"{what} {path!r} is not UTF-8 text ({e.reason} at byte {e.start})"
                         f"{hint}") from None
    except RecursionError:
        raise ValueError(f"{what} {path!r} nests too deeply to be read{hint}") from None


def _reject_constant(name: str) -> Any:
    # Python's json reads NaN and Infinity by default; they are not JSON and a figure that is
    # NaN is a failed run, so a reader must not take it as a number.
    raise json.JSONDecodeError(f"{name} is not a JSON number", name, 0)


def _torn_tail(path: str) -> tuple[int, str] | None:
    """(byte offset, text) of the last line of ``path`` if it was never finished (no final
    newline and not a JSON value: a write cut short), else None."""
    with open(path, "rb") as f:
        data = f.read()
    if not data or data.endswith(b"\n"):
        return None
    start = data.rfind(b"\n") + 1
    tail = data[start:].decode("utf-8", errors="replace")
    try:
        json.loads(tail, parse_constant=_reject_constant)
    except ValueError:
        return start, tail
    return None


def read_jsonl(path: str | os.PathLike, *, what: str = "JSON-lines file") -> list[Any]:
    """The records of a JSON-lines file, one per non-empty line.

    A last line that was never finished (no final newline, not valid JSON: a run killed while
    writing it) is skipped with a ``UserWarning`` naming the file and the line.

    Raises:
      FileNotFoundError: ``path`` does not exist.
      ValueError: any other line is not valid JSON (the message names the file and line).
    """
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{what} {path!r} not found")
    torn = _torn_tail(path)
    with open(path, encoding="utf-8", errors="replace") as f:
        lines = f.read().split("\n")
    records = []
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        if torn is not None and number == len(lines):
            warnings.warn(f"{what} {path!r}: skipping its half-written last line {number} "
                          f"({line[:60]!r}): the run writing it was interrupted", stacklevel=2)
            continue
        try:
            records.append(json.loads(line, parse_constant=_reject_constant))
        except ValueError as e:
            raise ValueError(f"{what} {path!r}: line {number} is not valid JSON ({e}); "
                             "remove or fix that line") from None
    return records


def repair_jsonl(path: str | os.PathLike, *, what: str = "JSON-lines file") -> None:
    """Cuts a half-written last line off ``path`` (see :func:`read_jsonl`) before appending,
    so that the next record does not fuse with it; warns naming the file. A missing file is
    left missing."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        return
    torn = _torn_tail(path)
    if torn is None:
        with open(path, "rb") as f:
            size = f.seek(0, os.SEEK_END)
            last = f.seek(size - 1) and f.read(1) if size else b"\n"
        if last != b"\n":  # a complete record whose newline was cut off: keep it, end it
            with open(path, "ab") as f:
                f.write(b"\n")
        return
    start, tail = torn
    warnings.warn(f"{what} {path!r}: removing its half-written last line ({tail[:60]!r}) "
                  "left by an interrupted run", stacklevel=2)
    with open(path, "r+b") as f:
        f.truncate(start)


def get_field(obj: Any, key: str, kinds: type | tuple[type, ...], *, path: str | os.PathLike,
              what: str, default: Any = ...) -> Any:
    """``obj[key]`` from a JSON object read from ``path``, checked strictly against
    ``kinds`` (``bool`` is never accepted for ``int`` or ``float``, an ``int`` is accepted
    for ``float``; numbers must be finite).

    Args:
      default: returned when ``key`` is missing; without it a missing key is an error.

    Raises:
      ValueError: ``obj`` is not an object, ``key`` is missing, or its value has the wrong
        type (the message names the file, the field and the value).
    """
    where = f"{what} {os.fspath(path)!r}"
    if not isinstance(obj, dict):
        raise ValueError(f"{where} must hold a JSON object, got {type(obj).__name__} "
                         f"{str(obj)[:60]}")
    if key not in obj:
        if default is ...:
            raise ValueError(f"{where} has no field {key!r} (fields: {sorted(obj)})")
        return default
    value = obj[key]
    kinds = kinds if isinstance(kinds, tuple) else (kinds,)
    accepted = kinds + ((int,) if float in kinds else ())
    wrong_bool = isinstance(value, bool) and bool not in kinds
    if wrong_bool or not isinstance(value, accepted):
        names = " or ".join(k.__name__ for k in kinds)
        raise ValueError(f"{where}: field {key!r} must be {names}, got {value!r} "
                         f"({type(value).__name__})")
    if isinstance(value, float) and not math.isfinite(value):
        raise ValueError(f"{where}: field {key!r} must be a finite number, got {value!r}")
    return value
