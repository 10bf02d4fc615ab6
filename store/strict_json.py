"""JSON as the contract reads it: numbers are finite (``json`` accepts ``NaN`` and ``Infinity``
by default), decoded by one decoder made once. ``json.loads`` with any option builds a decoder
and its scanner on every call, which costs more than decoding a small message, and the worker
decodes every event and impression message it takes."""

from __future__ import annotations

import json
from typing import Any


def _reject_constant(name: str) -> float:
    raise ValueError(f"{name} is not a JSON number")


_DECODER = json.JSONDecoder(parse_constant=_reject_constant)

decode = _DECODER.decode
"""Decodes text a caller has already read as UTF-8 and found free of a byte order mark (the
event validator, per message), refusing ``NaN`` and ``Infinity``: `loads` without its checks."""


def loads(document: str | bytes | bytearray) -> Any:
    """``json.loads(document)``, refusing ``NaN`` and ``Infinity``: text and bytes are read
    exactly as ``json.loads`` reads them, and every error is the one it raises.

    >>> loads('{"ts": 1.5}')
    {'ts': 1.5}
    >>> loads(b'[NaN]')
    Traceback (most recent call last):
    ...
    ValueError: NaN is not a JSON number
    """
    if isinstance(document, str):
        if document.startswith("\ufeff"):
            raise json.JSONDecodeError("Unexpected UTF-8 BOM (decode using utf-8-sig)", document, 0)
        return decode(document)
    return decode(document.decode(json.detect_encoding(document), "surrogatepass"))
