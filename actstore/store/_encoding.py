"""Dtypes and codecs: values in, stored bytes out, and back.

Writes go through zarr's codec pipeline (so any zarr reader can decode the
store); reads of whole chunks use `decode_chunk` here, which undoes exactly
the three codecs `zarr_compressors` configures, because zarr 3.1's sharded
read path is the bottleneck (DESIGN.md, "Facts that shape the hard parts").
"""

from __future__ import annotations

import google_crc32c
import numpy as np
import torch
from numcodecs import Blosc, Zstd
from zarr.codecs import BloscCodec, BloscShuffle, Crc32cCodec, ZstdCodec

from actstore.errors import CorruptDataError, DtypeOverflowError

_FLOAT16_MAX = float(np.finfo(np.float16).max)
_TORCH = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
_ZSTD_LEVEL = 3


def torch_dtype(dtype: str) -> torch.dtype:
    return _TORCH[dtype]


def to_storage(x: torch.Tensor | np.ndarray, dtype: str, what: str) -> np.ndarray:
    """Convert activations to the store's on-disk numpy dtype.

    Non-finite values and float16 overflow are errors naming `what` and the
    largest magnitude: a silent inf would poison every statistic downstream.
    The conversion is idempotent: uint16 input to a bfloat16 store is taken
    as bfloat16 bits (what this function returns for it).
    """
    if dtype == "bfloat16" and isinstance(x, np.ndarray) and x.dtype == np.uint16:
        x = from_storage(x, dtype)
    t = torch.as_tensor(x).detach().cpu()
    if not t.is_floating_point():
        raise TypeError(f"{what}: activations must be floating point, got {t.dtype}")
    if t.numel():
        peak = float(t.abs().amax())
        if not np.isfinite(peak):
            raise DtypeOverflowError(f"{what}: activations contain NaN or inf")
        if dtype == "float16" and peak > _FLOAT16_MAX:
            raise DtypeOverflowError(f"{what}: largest |value| {peak:.6g} overflows float16 "
                                     f"(max {_FLOAT16_MAX:.0f}); use dtype bfloat16 or float32")
    if dtype == "bfloat16":
        return t.to(torch.bfloat16).view(torch.int16).numpy().view(np.uint16)
    return t.to(_TORCH[dtype]).numpy()


def from_storage(a: np.ndarray, dtype: str) -> torch.Tensor:
    """Wrap stored values as a tensor of the logical dtype (no copy)."""
    t = torch.from_numpy(a)
    return t.view(torch.int16).view(torch.bfloat16) if dtype == "bfloat16" else t


def zarr_compressors(codec: str) -> list:
    """The bytes-to-bytes codecs of one inner chunk; crc32c always comes last."""
    if codec == "none":
        return [Crc32cCodec()]
    if codec == "blosc-lz4":
        return [BloscCodec(cname="lz4", clevel=5, shuffle=BloscShuffle.shuffle), Crc32cCodec()]
    if codec == "zstd":
        return [ZstdCodec(level=_ZSTD_LEVEL), Crc32cCodec()]
    raise ValueError(f"unknown codec {codec!r}")


def check_crc(buf: np.ndarray, key: str) -> np.ndarray:
    """Strip and verify the trailing little-endian crc32c of `buf` (uint8)."""
    if buf.size < 4:
        raise CorruptDataError(f"{key}: object truncated ({buf.size} bytes)", key)
    body = buf[:-4]
    stored = int.from_bytes(buf[-4:].tobytes(), "little")
    if google_crc32c.value(body) != stored:
        raise CorruptDataError(f"{key}: checksum mismatch (stored crc32c {stored:#010x})", key)
    return body


def decode_chunk(buf: np.ndarray, codec: str, out: np.ndarray, key: str) -> None:
    """Verify and decode one encoded inner chunk into `out` (its full chunk shape)."""
    body = check_crc(buf, key)
    dest = out.reshape(-1).view(np.uint8)
    try:
        if codec == "none":
            if body.size != dest.size:
                raise ValueError(f"{body.size} bytes, expected {dest.size}")
            dest[:] = body
        elif codec == "blosc-lz4":
            Blosc().decode(body, out=dest)
        elif codec == "zstd":
            Zstd().decode(body, out=dest)
        else:
            raise ValueError(f"unknown codec {codec!r}")
    except (RuntimeError, ValueError) as e:
        raise CorruptDataError(f"{key}: does not decode ({e})", key) from None
