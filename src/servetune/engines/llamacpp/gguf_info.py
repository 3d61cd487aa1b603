"""GGUF model files read without loading them: the model's context length, and whether the file
is a GGUF that is whole (not cut short) before llama-server is asked to load it.
"""

from __future__ import annotations

import logging
import mmap
import os
import struct
from pathlib import Path

logger = logging.getLogger(__name__)


def read_context_length(path: Path) -> int | None:
    """``<general.architecture>.context_length`` of a GGUF file, or None when it cannot be read."""
    try:
        from gguf import GGUFReader

        reader = GGUFReader(path)
        arch = reader.fields["general.architecture"].contents()
        value = reader.fields[f"{arch}.context_length"].contents()
        return int(value)
    except (OSError, KeyError, ValueError, TypeError) as e:
        logger.debug("cannot read the context length of %s: %s", path, e)
        return None


_GGUF_SCALAR = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?", 10: "<Q"}
_GGUF_SCALAR |= {11: "<q", 12: "<d"}
"""struct formats of GGUF's scalar value types (8 = string, 9 = array)."""


class _Cursor:
    """Little-endian reads over a GGUF file's bytes; raises IndexError past the end."""

    def __init__(self, data: bytes | mmap.mmap) -> None:
        self.data, self.pos = data, 0

    def take(self, fmt: str) -> int | float:
        size = struct.calcsize(fmt)
        if self.pos + size > len(self.data):
            raise IndexError(self.pos)
        (value,) = struct.unpack_from(fmt, self.data, self.pos)
        self.pos += size
        return value  # type: ignore[no-any-return]

    def string(self) -> str:
        n = int(self.take("<Q"))
        if self.pos + n > len(self.data):
            raise IndexError(self.pos)
        raw = bytes(self.data[self.pos : self.pos + n])
        self.pos += n
        return raw.decode("utf-8", errors="replace")

    def value(self, vtype: int) -> object:
        if vtype == 8:
            return self.string()
        if vtype == 9:
            etype, count = int(self.take("<I")), int(self.take("<Q"))
            if etype in _GGUF_SCALAR and etype != 8:
                size = struct.calcsize(_GGUF_SCALAR[etype]) * count
                if self.pos + size > len(self.data):
                    raise IndexError(self.pos)
                self.pos += size
                return None
            for _ in range(count):
                self.value(etype)
            return None
        if vtype not in _GGUF_SCALAR:
            raise ValueError(f"unknown GGUF value type {vtype}")
        return self.take(_GGUF_SCALAR[vtype])


def gguf_size_problem(path: Path) -> str | None:
    """Why the GGUF file at ``path`` cannot be loaded whole, as the end of a sentence starting
    with its path (None when its header parses and its size covers every tensor's data).

    Reads the header, metadata and tensor infos (GGUF v2/v3: ggml docs/gguf.md), computes where
    the last tensor's data ends (data start aligned to ``general.alignment``, default 32; each
    tensor's bytes from ``gguf.GGML_QUANT_SIZES``) and compares it with the file size: a copy or
    download cut short is caught before llama-server fails on it."""
    from gguf.constants import GGML_QUANT_SIZES, GGMLQuantizationType

    try:
        with path.open("rb") as f:
            size = os.fstat(f.fileno()).st_size
            if size == 0:
                return "is empty"
            data = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
    except (OSError, ValueError) as e:
        return f"cannot be read: {e}"
    cur = _Cursor(data)
    try:
        if bytes(data[:4]) != b"GGUF":
            return "is not a GGUF file"
        cur.pos = 4
        version = int(cur.take("<I"))
        if version < 2:
            return None  # GGUF v1 (2023) uses 32-bit counts; llama.cpp no longer loads it anyway
        n_tensors, n_kv = int(cur.take("<Q")), int(cur.take("<Q"))
        alignment = 32
        for _ in range(n_kv):
            key = cur.string()
            value = cur.value(int(cur.take("<I")))
            if key == "general.alignment" and isinstance(value, int):
                alignment = value or 32
        end = 0
        for _ in range(n_tensors):
            cur.string()
            dims = [int(cur.take("<Q")) for _ in range(int(cur.take("<I")))]
            ggml_type, offset = int(cur.take("<I")), int(cur.take("<Q"))
            block, type_size = GGML_QUANT_SIZES[GGMLQuantizationType(ggml_type)]
            elements = 1
            for d in dims:
                elements *= d
            end = max(end, offset + elements // block * type_size)
        start = -(-cur.pos // alignment) * alignment
    except IndexError:
        return (
            f"is truncated: it ends at byte {size:,}, inside its header (metadata and tensor list)"
        )
    except (ValueError, KeyError) as e:
        return f"is damaged: its header cannot be read ({e})"
    finally:
        data.close()
    need = start + end
    if size < need:
        return (
            f"is truncated: its tensor data ends at byte {need:,} but the file has {size:,} "
            f"bytes ({need - size:,} missing)"
        )
    return None


def _is_gguf(path: Path) -> bool:
    try:
        with path.open("rb") as f:
            return f.read(4) == b"GGUF"
    except OSError:
        return False
