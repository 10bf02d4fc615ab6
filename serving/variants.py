"""A/B variants: named funnel configurations, users bucketed deterministically by a hash.

A user's bucket is ``blake2b(salt:user)`` mapped to [0, 1); variants take consecutive slices of
that interval by their share. The same user always lands in the same variant (across readers
and restarts), and changing the salt reshuffles everyone at once for a new experiment.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from dataclasses import dataclass
from typing import Any

from freshrec.serving.funnel_config import FunnelConfig


@dataclass(frozen=True)
class Variant:
    name: str
    share: float
    config: FunnelConfig


class Variants:
    """Parses ``{"name": {"share": 0.5, "diversity": 0.3, ...}, ...}`` over a base config.

    Examples
    --------
    >>> spec = '{"control": {"share": 0.5}, "diverse": {"share": 0.5, "diversity": 0.6}}'
    >>> v = Variants.parse(spec, FunnelConfig())
    >>> v.assign("user-42").name == v.assign("user-42").name
    True
    >>> sorted(v.names)
    ['control', 'diverse']
    """

    def __init__(self, variants: list[Variant], salt: str = "freshrec") -> None:
        total = sum(v.share for v in variants)
        if not variants or abs(total - 1.0) > 1e-9:
            raise ValueError(f"variant shares must add up to 1, got {total}")
        self.variants = variants
        self.salt = salt
        self.names = [v.name for v in variants]

    @classmethod
    def parse(cls, raw: str, base: FunnelConfig, salt: str = "freshrec") -> Variants:
        if not raw.strip():
            return cls([Variant("control", 1.0, base)], salt)
        try:
            spec: dict[str, dict[str, Any]] = json.loads(raw)
        except ValueError as exc:
            raise ValueError(f"FRESHREC_VARIANTS is not JSON: {exc}") from None
        known = {f.name for f in dataclasses.fields(FunnelConfig)}
        variants = []
        for name, fields in spec.items():
            fields = dict(fields)
            share = float(fields.pop("share", 0.0))
            unknown = set(fields) - known
            if unknown:
                raise ValueError(f"variant {name!r}: unknown settings {sorted(unknown)}")
            if "rating_scale" in fields:  # the data's, not an experiment's (FRESHREC_RATING_*)
                raise ValueError(f"variant {name!r}: rating_scale is not a variant setting")
            if "channels" in fields:
                fields["channels"] = tuple(fields["channels"])
            if "blend" in fields:
                fields["blend"] = tuple((str(k), float(v)) for k, v in fields["blend"].items())
            variants.append(Variant(name, share, dataclasses.replace(base, **fields)))
        return cls(variants, salt)

    def bucket(self, user_id: str) -> float:
        digest = hashlib.blake2b(f"{self.salt}:{user_id}".encode(), digest_size=8).digest()
        return int.from_bytes(digest, "big") / 2**64

    def assign(self, user_id: str) -> Variant:
        point, edge = self.bucket(user_id), 0.0
        for variant in self.variants:
            edge += variant.share
            if point < edge:
                return variant
        return self.variants[-1]
