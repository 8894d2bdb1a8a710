"""A safetensors file read with plain `readinto` at known offsets, straight into the destination.

The format is an 8-byte little-endian header length, a JSON header (per tensor: dtype, shape,
data_offsets into the data that follows), then the raw little-endian tensor bytes. Reading a
tensor here is one positioned read into the memory that keeps it (a slice of an expert stack,
say): no memory map, no intermediate tensor, and large sequential reads, which matter when several
expert actors read one checkpoint at once (page-fault-sized reads of a memory map ran at about half
the disk's speed with four readers).
"""

from __future__ import annotations

import json
import os
import struct
import sys
from pathlib import Path

import torch

DTYPES = {"F64": torch.float64, "F32": torch.float32, "BF16": torch.bfloat16, "F16": torch.float16,
          "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
          "BOOL": torch.bool, "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2}
MAX_HEADER = 100 << 20
CHUNK = 64 << 20  # bytes per read call


class SafetensorsError(ValueError):
    pass


class SafetensorsFile:
    def __init__(self, path: str | Path) -> None:
        if sys.byteorder != "little":  # the bytes are copied as they are: little-endian only
            raise SafetensorsError("this reader needs a little-endian machine")
        self.path = Path(path)
        self.fd = os.open(self.path, os.O_RDONLY)
        try:
            size = os.fstat(self.fd).st_size
            head = os.pread(self.fd, 8, 0)
            if len(head) < 8:
                raise SafetensorsError("too short for a safetensors header")
            (n,) = struct.unpack("<Q", head)
            if not 0 < n <= min(MAX_HEADER, size - 8):
                raise SafetensorsError(f"header length {n} does not fit the file ({size} bytes)")
            try:
                header = json.loads(os.pread(self.fd, n, 8))
            except (UnicodeDecodeError, json.JSONDecodeError) as e:
                raise SafetensorsError(f"header is not JSON ({e})") from None
            if not isinstance(header, dict):
                raise SafetensorsError("header is not a JSON object")
            self.data_start = 8 + n
            self.tensors: dict[str, tuple[torch.dtype, tuple[int, ...], int, int]] = {}
            for name, info in header.items():
                if name == "__metadata__":
                    continue
                try:
                    dtype, shape, (begin, end) = DTYPES[info["dtype"]], tuple(int(s) for s in info["shape"]), \
                        info["data_offsets"]
                except KeyError as e:  # a dtype this reader does not know, or a missing key
                    raise SafetensorsError(f"tensor {name}: unsupported or missing {e}") from None
                except (TypeError, ValueError) as e:
                    raise SafetensorsError(f"tensor {name}: bad header entry ({e!r})") from None
                numel = 1
                for s in shape:
                    numel *= s
                if not (isinstance(begin, int) and isinstance(end, int)) or end - begin != numel * dtype.itemsize \
                        or not 0 <= begin <= end <= size - self.data_start:
                    raise SafetensorsError(f"tensor {name}: offsets {begin}..{end} do not match its shape or the file")
                self.tensors[name] = (dtype, shape, self.data_start + begin, end - begin)
        except BaseException:
            os.close(self.fd)
            raise

    def keys(self) -> list[str]:
        return list(self.tensors)

    def info(self, name: str) -> tuple[torch.dtype, tuple[int, ...], int]:
        """(dtype, shape, bytes) of a tensor, from the header."""
        dtype, shape, _, nbytes = self.tensors[name]
        return dtype, shape, nbytes

    def read(self, name: str, out: torch.Tensor | None = None) -> torch.Tensor:
        """The tensor in its file dtype, read into `out` when given (a contiguous CPU tensor of that
        dtype and shape) or into a new tensor."""
        dtype, shape, offset, nbytes = self.tensors[name]
        if out is None:
            out = torch.empty(shape, dtype=dtype)
        elif out.dtype != dtype or tuple(out.shape) != shape or not out.is_contiguous() or out.device.type != "cpu":
            raise ValueError(f"tensor {name}: `out` must be a contiguous CPU {dtype} tensor of shape {shape}")
        buf = memoryview(out.view(-1).view(torch.uint8).numpy())
        done = 0
        while done < nbytes:
            k = os.preadv(self.fd, [buf[done:min(nbytes, done + CHUNK)]], offset + done)
            if k <= 0:
                raise SafetensorsError(f"tensor {name}: the file ended after {done} of {nbytes} bytes")
            done += k
        return out

    def close(self) -> None:
        os.close(self.fd)
