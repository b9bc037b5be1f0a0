"""The safetensors file format, in one place: the dtype table, the header reader and its validator
(shared by `inspect` for plans and `merge` for reading and writing shards) and the header writer.
Reads headers only (never tensor data); imports neither numpy nor torch."""
from __future__ import annotations

import json
import math
import os
import struct
from pathlib import Path
from typing import Any

DTYPE_BYTES: dict[str, float] = {
    "F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1,
    "BOOL": 1, "F8_E4M3": 1, "F8_E5M2": 1, "U16": 2, "U32": 4, "U64": 8, "F8_E8M0": 1, "F4": 0.5,
    "F8_E4M3FN": 1, "F8_E4M3FNUZ": 1, "F8_E5M2FNUZ": 1,
}
TORCH_NAMES = {  # safetensors code -> torch dtype name, for the codes torch (and the merge) can hold
    "F64": "float64", "F32": "float32", "F16": "float16", "BF16": "bfloat16", "I64": "int64", "I32": "int32",
    "I16": "int16", "I8": "int8", "U8": "uint8", "BOOL": "bool", "F8_E4M3": "float8_e4m3fn",
    "F8_E5M2": "float8_e5m2", "U16": "uint16", "U32": "uint32", "U64": "uint64",
}


class HeaderError(ValueError):
    """A safetensors header that is not what the format says (the message names the file and entry)."""


MAX_HEADER_BYTES = 100 << 20  # the limit safetensors itself enforces


def _int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def validate_safetensors_header(header: Any, *, path: str | Path, size: int, data_start: int
                                ) -> tuple[dict[str, tuple[str, tuple[int, ...], int, int]], dict[str, str]]:
    """Check a parsed safetensors header against the format and the file's size; the one validator `plan`
    (inspect) and `merge` (merge.shard_read) share. Returns ``{name: (dtype, shape, begin, end)}`` (offsets relative
    to the data start, in file order) and ``__metadata__``. Raises HeaderError naming the file and entry."""
    if not isinstance(header, dict):
        raise HeaderError(f"{path}: the safetensors header is a JSON {type(header).__name__}, not an object")
    meta = header.get("__metadata__", {})
    if meta is None:
        meta = {}
    if not isinstance(meta, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in meta.items()):
        raise HeaderError(f"{path}: __metadata__ must be an object of strings")
    out: dict[str, tuple[str, tuple[int, ...], int, int]] = {}
    for name, d in header.items():
        if name == "__metadata__":
            continue
        if not isinstance(d, dict):
            raise HeaderError(f"{path}: header entry {name!r} is not an object")
        dt, shape, offs = d.get("dtype"), d.get("shape"), d.get("data_offsets")
        if not isinstance(dt, str) or dt not in DTYPE_BYTES:
            raise HeaderError(f"{path}: tensor {name!r} has unknown dtype {dt!r}")
        if not isinstance(shape, list) or not all(_int(x) and 0 <= x < 1 << 40 for x in shape):
            raise HeaderError(f"{path}: tensor {name!r} has a bad shape {json.dumps(shape)[:60]}")
        if not (isinstance(offs, list) and len(offs) == 2 and all(_int(x) for x in offs)):
            raise HeaderError(f"{path}: tensor {name!r} has bad data_offsets {json.dumps(offs)[:60]} "
                              "(two integers)")
        b, e = offs
        nbytes = math.prod(shape) * DTYPE_BYTES[dt]
        if not 0 <= b <= e or e - b != nbytes or data_start + e > size:
            raise HeaderError(f"{path}: tensor {name!r} data_offsets [{b}, {e}] do not fit its {dt}{shape} "
                              f"({nbytes:g} bytes) inside the file ({size - data_start} data bytes)")
        out[name] = (dt, tuple(shape), b, e)
    order = sorted(out.items(), key=lambda kv: kv[1][2])
    for (n0, (_, _, _, e0)), (n1, (_, _, b1, _)) in zip(order, order[1:]):
        if b1 < e0:
            raise HeaderError(f"{path}: tensors {n0!r} and {n1!r} overlap in the file")
    return dict(order), dict(meta)


def read_raw_header(path: str | os.PathLike[str]) -> tuple[dict[str, Any], int, int]:
    """(parsed JSON header, file size, data start) of a safetensors file; HeaderError if it is not one."""
    p = Path(path)
    size = p.stat().st_size
    with open(p, "rb") as f:
        raw = f.read(8)
        if len(raw) != 8:
            raise HeaderError(f"{p} is not a safetensors file (shorter than 8 bytes)")
        (n,) = struct.unpack("<Q", raw)
        if n > min(size - 8, MAX_HEADER_BYTES):
            raise HeaderError(f"{p} is not a valid safetensors file (header length {n})")
        try:
            header = json.loads(f.read(n))
        except (ValueError, RecursionError) as e:
            raise HeaderError(f"{p}: bad safetensors header ({e})") from None
    return header, size, 8 + n


def build_header(entries: list[tuple[str, str, tuple[int, ...], int]], metadata: dict[str, str] | None = None
                 ) -> bytes:
    """The 8-byte length + JSON header for tensors laid out back to back in this order:
    entries = [(name, dtype code, shape, nbytes)]; the data section starts 8-byte aligned, as
    safetensors writes it."""
    hdr: dict[str, Any] = {}
    if metadata is not None:
        hdr["__metadata__"] = metadata
    off = 0
    for name, dtype, shape, nbytes in entries:
        hdr[name] = {"dtype": dtype, "shape": list(shape), "data_offsets": [off, off + nbytes]}
        off += nbytes
    js = json.dumps(hdr, separators=(",", ":")).encode()
    js += b" " * (-len(js) % 8)
    return struct.pack("<Q", len(js)) + js
