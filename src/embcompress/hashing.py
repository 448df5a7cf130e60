"""Hash functions from ids to buckets, with their parameters stored in artifacts.

``mod``:       h(i) = i mod m                       (the hashing-trick baseline)
``universal``: h(i) = ((a*i + b) mod p) mod m        (Carter-Wegman, p = 2^31 - 1)
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

import torch

__all__ = ["HashFunction", "PRIME"]

PRIME = 2_147_483_647  # 2^31 - 1; a*i stays below 2^62 for ids < 2^31


@dataclass(frozen=True)
class HashFunction:
    kind: str
    buckets: int
    a: int = 1
    b: int = 0

    def __post_init__(self) -> None:
        if self.kind not in ("mod", "universal"):
            raise ValueError(f"hash kind must be 'mod' or 'universal', got {self.kind!r}")
        if self.buckets < 1:
            raise ValueError(f"buckets must be positive, got {self.buckets}")

    @classmethod
    def create(cls, kind: str, buckets: int, generator: torch.Generator | None = None) -> "HashFunction":
        if kind == "universal":
            a = int(torch.randint(1, PRIME, (1,), generator=generator))
            b = int(torch.randint(0, PRIME, (1,), generator=generator))
            return cls(kind, buckets, a, b)
        return cls(kind, buckets)

    def __call__(self, ids: torch.Tensor) -> torch.Tensor:
        ids = ids.long()
        if self.kind == "mod":
            return ids % self.buckets
        return ((ids * self.a + self.b) % PRIME) % self.buckets

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: "dict[str, Any] | HashFunction") -> "HashFunction":
        if isinstance(data, HashFunction):
            return data
        try:
            return cls(**data)
        except TypeError as exc:
            raise ValueError(f"invalid hash parameters {data!r}") from exc
