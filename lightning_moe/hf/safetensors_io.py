"""The safetensors file format read and written with plain file I/O, one tensor (or rows of one) at a time.

A file is an 8-byte little-endian header length, a JSON header (``name -> {dtype, shape,
data_offsets}``, offsets relative to the data that follows), then the tensors' bytes. Reading
with ``readinto`` straight into the tensor that keeps the values, and writing from the
tensor's own memory, keeps only that tensor in the process: a memory map would count every
page read in the process's resident set until it is closed, and ``safetensors.torch.save_file``
holds a bytes copy of the whole file.
"""

from __future__ import annotations

import json
import math
import struct
from typing import IO, Any

import torch
from torch import Tensor

DTYPES = {
    "BF16": torch.bfloat16, "F16": torch.float16, "F32": torch.float32, "F64": torch.float64,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "BOOL": torch.bool, "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2,
}
NAMES = {dtype: name for name, dtype in DTYPES.items()}


def read_header(fh: IO[bytes]) -> tuple[int, dict[str, Any]]:
    """``(offset of the data, header)`` of the open file ``fh``."""
    fh.seek(0)
    (length,) = struct.unpack("<Q", fh.read(8))
    return 8 + length, json.loads(fh.read(length))


def bytes_of(tensor: Tensor) -> memoryview:
    """The bytes of a contiguous CPU tensor, without a copy."""
    return memoryview(tensor.reshape(-1).view(torch.uint8).numpy())


def read_rows(fh: IO[bytes], data_offset: int, entry: dict[str, Any], out: Tensor, start: int = 0) -> None:
    """Fill the contiguous tensor ``out`` with rows ``start:start + len(out)`` of the tensor ``entry``
    describes (its dtype: ``out``'s must match), reading only those bytes."""
    shape = entry["shape"]
    row_bytes = math.prod(shape[1:]) * out.element_size() if shape else out.element_size()
    fh.seek(data_offset + entry["data_offsets"][0] + start * row_bytes)
    view = bytes_of(out)
    done = 0
    while done < len(view):
        n = fh.readinto(view[done:])
        if not n:
            raise EOFError(f"safetensors file {getattr(fh, 'name', '?')} ends inside a tensor")
        done += n


def header_for(entries: list[tuple[str, torch.dtype, tuple[int, ...]]]) -> bytes:
    """The length-prefixed header of a file holding ``entries`` (name, dtype, shape), in that order."""
    header: dict[str, Any] = {"__metadata__": {"format": "pt"}}
    offset = 0
    for name, dtype, shape in entries:
        size = math.prod(shape) * torch.empty((), dtype=dtype).element_size()
        header[name] = {"dtype": NAMES[dtype], "shape": list(shape), "data_offsets": [offset, offset + size]}
        offset += size
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)  # the data starts 8-byte aligned, as safetensors writes it
    return struct.pack("<Q", len(text)) + text
