"""Out-of-core safetensors reading (writing: shard_write.py; the format itself — dtype table, header reader,
validator and writer — is peftdeploy/safetensors_format.py).

The safetensors format is: an 8-byte little-endian header length ``N``, ``N`` bytes of JSON (a map
``name -> {"dtype", "shape", "data_offsets": [begin, end]}`` plus an optional ``"__metadata__"``
map of strings), then the raw little-endian tensor bytes; offsets are relative to the end of the
header and the tensors cover the data section contiguously.

Reading: we parse headers ourselves and read tensor bytes with ``os.pread`` (or copy them
kernel-side with ``os.copy_file_range``) one tensor at a time. ``safetensors.safe_open`` memory-maps
the whole file, and every page touched through a map counts as resident memory of the process
until the file is closed — so reading a shard through it costs up to the whole shard in RSS. A
``pread`` costs one tensor.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from peftdeploy.safetensors_format import (DTYPE_BYTES, TORCH_NAMES, HeaderError, read_raw_header,
                                           validate_safetensors_header)

if TYPE_CHECKING:  # torch/numpy are imported lazily: reading headers (cache lookups) must not pay for them
    import numpy as np
    import torch

_maps: tuple[dict, dict] | None = None


def _torch_maps() -> tuple[dict[str, "torch.dtype"], dict["torch.dtype", str]]:
    global _maps
    if _maps is None:
        import torch

        st2t = {k: getattr(torch, v) for k, v in TORCH_NAMES.items() if hasattr(torch, v)}
        _maps = (st2t, {v: k for k, v in st2t.items()})
    return _maps


def torch_dtype(code: str) -> "torch.dtype":
    """torch dtype of a safetensors dtype code ("BF16" -> torch.bfloat16)."""
    return _torch_maps()[0][code]


def st_code(dtype: "torch.dtype") -> str:
    """safetensors dtype code of a torch dtype (torch.bfloat16 -> "BF16")."""
    return _torch_maps()[1][dtype]


ST_ITEMSIZE: dict[str, int] = {k: int(DTYPE_BYTES[k]) for k in TORCH_NAMES}  # the codes the merge reads
FLOAT_ST = {"F64", "F32", "F16", "BF16"}

class SafetensorsFormatError(ValueError):
    pass


@dataclass(frozen=True)
class TensorInfo:
    name: str
    dtype: str  # safetensors code, e.g. "BF16"
    shape: tuple[int, ...]
    file: Path
    offset: int  # absolute byte offset of the data in `file`
    nbytes: int

    @property
    def torch_dtype(self) -> "torch.dtype":
        return torch_dtype(self.dtype)

    @property
    def numel(self) -> int:
        n = 1
        for s in self.shape:
            n *= s
        return n


@dataclass(frozen=True)
class SafetensorsHeader:
    path: Path
    size: int
    data_start: int
    tensors: dict[str, TensorInfo]  # in data-offset order
    metadata: dict[str, str]


def read_header(path: str | os.PathLike[str]) -> SafetensorsHeader:
    """Parse a safetensors file's header without touching the tensor data."""
    path = Path(path)
    try:
        header, size, data_start = read_raw_header(path)
        entries, metadata = validate_safetensors_header(header, path=path, size=size, data_start=data_start)
    except HeaderError as e:
        raise SafetensorsFormatError(str(e)) from None
    items = []
    for name, (dt, shape, b, e) in entries.items():
        if dt not in ST_ITEMSIZE:
            raise SafetensorsFormatError(f"{path}: tensor {name!r} has dtype {dt}, which the merge cannot read")
        items.append(TensorInfo(name, dt, shape, path, data_start + b, e - b))
    items.sort(key=lambda t: t.offset)
    return SafetensorsHeader(path, size, data_start, {t.name: t for t in items}, dict(metadata))


_EXP_MASK = {"BF16": ("<u2", 0x7F80), "F16": ("<u2", 0x7C00), "F32": ("<u4", 0x7F800000),
             "F64": ("<u8", 0x7FF0000000000000)}


def nonfinite_count(code: str, data: Any) -> int:
    """NaN/inf values (all exponent bits set) in the raw bytes of a float tensor of dtype `code` (0 for
    other dtypes): one masked compare, no conversion."""
    import numpy as np

    m = _EXP_MASK.get(code)
    if m is None:
        return 0
    dt = np.dtype(m[0])
    a = np.frombuffer(data, dtype=np.uint8)
    a = a[: a.size - a.size % dt.itemsize].view(dt)
    mask = dt.type(m[1])
    return int(np.count_nonzero((a & mask) == mask))


def file_nonfinite(path: str | os.PathLike[str]) -> dict[str, int]:
    """Tensor name -> NaN/inf count for the float tensors of a safetensors file that hold any."""
    h = read_header(path)
    out: dict[str, int] = {}
    fd = os.open(h.path, os.O_RDONLY)
    try:
        for t in h.tensors.values():
            if t.dtype in _EXP_MASK and t.nbytes:
                n = nonfinite_count(t.dtype, pread_exact(fd, t.nbytes, t.offset))
                if n:
                    out[t.name] = n
    finally:
        os.close(fd)
    return out


def pread_exact(fd: int, nbytes: int, offset: int, into: memoryview | None = None) -> memoryview:
    """Read exactly `nbytes` at `offset` (loops over short reads) into a fresh or given buffer."""
    buf = into if into is not None else memoryview(bytearray(nbytes))
    got = 0
    while got < nbytes:
        n = os.preadv(fd, [buf[got:nbytes]], offset + got)
        if n <= 0:
            raise SafetensorsFormatError(f"unexpected end of file reading {nbytes} bytes at {offset}")
        got += n
    return buf[:nbytes]


def read_tensor(fd: int, info: TensorInfo, buf: "torch.Tensor | None" = None) -> "torch.Tensor":
    """Read one tensor (a private, writable copy) with pread: RSS grows by this tensor only.

    `buf`: a uint8 tensor of at least info.nbytes to read into (reused buffers avoid page faults).
    """
    import torch

    dt = info.torch_dtype
    if info.nbytes == 0:
        return torch.empty(info.shape, dtype=dt)
    t = buf[: info.nbytes] if buf is not None else torch.empty(info.nbytes, dtype=torch.uint8)
    pread_exact(fd, info.nbytes, info.offset, memoryview(t.numpy()))
    return t.view(dt).reshape(info.shape)


# numpy storage dtype of each safetensors code (numpy has no bfloat16/float8: their bits as uints)
NP_STORAGE: dict[str, str] = {
    "F64": "<f8", "F32": "<f4", "F16": "<f2", "BF16": "<u2", "I64": "<i8", "I32": "<i4", "I16": "<i2",
    "I8": "i1", "U8": "u1", "BOOL": "?", "F8_E4M3": "u1", "F8_E5M2": "u1", "U16": "<u2", "U32": "<u4",
    "U64": "<u8",
}


def raw_array(code: str, data: "np.ndarray", shape: tuple[int, ...]) -> "np.ndarray":
    """A uint8 numpy buffer (at least the tensor's size) viewed as the tensor, in its storage dtype."""
    import numpy as np

    n = ST_ITEMSIZE[code]
    for s in shape:
        n *= s
    return data[:n].view(np.dtype(NP_STORAGE[code])).reshape(shape)


def read_array(fd: int, info: TensorInfo, buf: "np.ndarray | None" = None) -> "np.ndarray":
    """Read one tensor with pread into a numpy array of its storage dtype (bf16 as uint16), without torch.

    `buf`: a uint8 numpy array of at least info.nbytes to read into (reused buffers avoid page faults).
    """
    import numpy as np

    t = buf[: info.nbytes] if buf is not None else np.empty(info.nbytes, dtype=np.uint8)
    if info.nbytes:
        pread_exact(fd, info.nbytes, info.offset, memoryview(t))
    return raw_array(info.dtype, t, info.shape)


def to_float32(code: str, arr: "np.ndarray") -> "np.ndarray":
    """A float tensor's storage array (see NP_STORAGE) as float32 (exact except F64, rounded to nearest)."""
    import numpy as np

    if code == "BF16":
        return (arr.astype(np.uint32) << 16).view(np.float32)
    if code in ("F16", "F32", "F64"):
        return arr.astype(np.float32)
    raise ValueError(f"not a float dtype this engine converts: {code}")
