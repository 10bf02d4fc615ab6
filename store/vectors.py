"""Packed little-endian float32 vectors: the on-Redis form of every factor vector."""

from __future__ import annotations

import numpy as np

VECTOR_DTYPE = np.dtype("<f4")


def encode_vector(vec: np.ndarray) -> bytes:
    return np.asarray(vec, dtype=VECTOR_DTYPE).tobytes()


def decode_vector(blob: bytes) -> np.ndarray:
    """float64 copy for arithmetic; storage stays float32 to halve memory and bandwidth."""
    return np.frombuffer(blob, dtype=VECTOR_DTYPE).astype(np.float64)
