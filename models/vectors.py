"""Packed little-endian float32 vectors: the on-Redis form of every factor vector."""

from __future__ import annotations

import numpy as np

VECTOR_DTYPE = np.dtype("<f4")


def encode_vector(vec: np.ndarray) -> bytes:
    return np.asarray(vec, dtype=VECTOR_DTYPE).tobytes()


def decode_vector(blob: bytes) -> np.ndarray:
    """float64 copy for arithmetic; storage stays float32 to halve memory and bandwidth."""
    return np.frombuffer(blob, dtype=VECTOR_DTYPE).astype(np.float64)


def decode_matrix(blobs: list[bytes | None], width: int) -> tuple[np.ndarray, np.ndarray]:
    """Stack blobs into a (n, width) float32 matrix; the mask says which rows were present."""
    out = np.zeros((len(blobs), width), dtype=np.float32)
    present = np.zeros(len(blobs), dtype=bool)
    for row, blob in enumerate(blobs):
        if blob is not None and len(blob) == 4 * width:
            out[row] = np.frombuffer(blob, dtype=VECTOR_DTYPE)
            present[row] = True
    return out, present
