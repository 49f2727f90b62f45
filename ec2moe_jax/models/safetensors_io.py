"""A small, dependency-free safetensors reader and writer (numpy; no torch).

Format: an 8-byte little-endian header length N, N bytes of JSON mapping each tensor name to
``{"dtype", "shape", "data_offsets": [begin, end]}`` (offsets into the data that follows),
then the raw little-endian data. Sharded checkpoints add ``model.safetensors.index.json``
with a ``weight_map`` from tensor name to file.
"""

from __future__ import annotations

import json
import os
import struct

import ml_dtypes
import numpy as np

from ec2moe_jax.files import atomic_write, get_field, read_json

_DTYPES = {
    "F64": np.dtype("<f8"), "F32": np.dtype("<f4"), "F16": np.dtype("<f2"),
    "BF16": np.dtype(ml_dtypes.bfloat16), "I64": np.dtype("<i8"), "I32": np.dtype("<i4"),
    "I16": np.dtype("<i2"), "I8": np.dtype("i1"), "U8": np.dtype("u1"), "BOOL": np.dtype("?"),
    # block-FP8 checkpoints (dequantized at load by models/hf_quant.py)
    "F8_E4M3": np.dtype(ml_dtypes.float8_e4m3fn), "F8_E5M2": np.dtype(ml_dtypes.float8_e5m2),
}
_NAMES = {v: k for k, v in _DTYPES.items()}
_MAX_HEADER = 100 << 20


def read_file(path: str) -> dict[str, np.ndarray]:
    """All tensors of one ``.safetensors`` file (memory-mapped, then copied per tensor)."""
    size = os.path.getsize(path)
    with open(path, "rb") as f:
        raw = f.read(8)
        if len(raw) < 8:
            raise ValueError(f"{path!r} is not a safetensors file (shorter than 8 bytes)")
        (n,) = struct.unpack("<Q", raw)
        if n > min(_MAX_HEADER, size - 8):
            raise ValueError(f"{path!r}: header length {n} exceeds the file ({size} bytes)")
        try:
            header = json.loads(f.read(n))
        except ValueError as e:
            raise ValueError(f"{path!r}: safetensors header is not valid JSON") from e
    if not isinstance(header, dict):
        raise ValueError(f"{path!r}: safetensors header is not a JSON object")
    data = np.memmap(path, dtype=np.uint8, mode="r", offset=8 + n)
    out = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        try:
            dtype_name, shape, (begin, end) = info["dtype"], info["shape"], info["data_offsets"]
        except (KeyError, TypeError, ValueError) as e:
            raise ValueError(f"{path!r}: malformed header entry for tensor {name!r}") from e
        if dtype_name not in _DTYPES:
            raise ValueError(f"{path!r}: tensor {name!r} has unsupported dtype {dtype_name}")
        if not (isinstance(begin, int) and isinstance(end, int) and 0 <= begin <= end
                and all(isinstance(d, int) and d >= 0 for d in shape)):
            raise ValueError(f"{path!r}: tensor {name!r} has bad offsets {begin}..{end} or "
                             f"shape {shape}")
        dtype = _DTYPES[info["dtype"]]
        count = int(np.prod(info["shape"], dtype=np.int64))
        if end - begin != count * dtype.itemsize or end > data.shape[0]:
            raise ValueError(f"{path!r}: tensor {name!r} offsets {begin}..{end} do not match "
                             f"shape {info['shape']} of {info['dtype']}")
        out[name] = np.frombuffer(data[begin:end].tobytes(), dtype).reshape(info["shape"])
    return out


def read_checkpoint(folder: str) -> dict[str, np.ndarray]:
    """All tensors of a Hugging Face folder: one file or shards with an index."""
    index = os.path.join(folder, "model.safetensors.index.json")
    single = os.path.join(folder, "model.safetensors")
    if os.path.exists(index):
        what = "safetensors index"
        weight_map = get_field(read_json(index, what=what), "weight_map", dict, path=index,
                               what=what)
        bad = [k for k, v in weight_map.items() if not isinstance(v, str)]
        if bad:
            raise ValueError(f"{what} {index!r}: field 'weight_map' maps {bad[0]!r} to "
                             f"{weight_map[bad[0]]!r}, not a file name")
        files = sorted(set(weight_map.values()))
    elif os.path.exists(single):
        files = ["model.safetensors"]
    else:
        raise FileNotFoundError(f"no model.safetensors or model.safetensors.index.json in "
                                f"{folder!r} (torch .bin checkpoints are not supported)")
    tensors: dict[str, np.ndarray] = {}
    for name in files:
        if os.path.isabs(name) or os.path.normpath(name).startswith(".."):
            raise ValueError(f"index of {folder!r} points outside the folder: {name!r}")
        path = os.path.join(folder, name)
        if not os.path.exists(path):
            raise FileNotFoundError(f"shard {name!r} listed in the index is missing from "
                                    f"{folder!r}")
        tensors.update(read_file(path))
    return tensors


def write_file(path: str, tensors: dict[str, np.ndarray]) -> None:
    """Writes tensors as one safetensors file (atomically: temp file, then rename)."""
    header, chunks, offset = {}, [], 0
    for name in sorted(tensors):
        arr = np.ascontiguousarray(tensors[name])
        if arr.dtype not in _NAMES:
            raise ValueError(f"tensor {name!r} has unsupported dtype {arr.dtype}")
        raw = arr.astype(arr.dtype.newbyteorder("<")).tobytes()
        header[name] = {"dtype": _NAMES[arr.dtype], "shape": list(arr.shape),
                        "data_offsets": [offset, offset + len(raw)]}
        chunks.append(raw)
        offset += len(raw)
    blob = json.dumps(header).encode()
    blob += b" " * (-len(blob) % 8)
    with atomic_write(path, "wb") as f:
        f.write(struct.pack("<Q", len(blob)) + blob)
        for c in chunks:
            f.write(c)
