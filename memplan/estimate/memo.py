"""A bounded memo keyed by an object's identity (memplan.estimate.activations and weights.per_setup): hashing a
ModelSpec or an Unsharded walks every parameter group, which costs more than the function it would save, so the key
holds id(obj) and a hit is checked against the object itself (an id is reused only once its object is gone)."""
from __future__ import annotations

from typing import Callable, Hashable, TypeVar

T = TypeVar("T")


class IdentityMemo:
    """{key: (obj, value)}, emptied whole when it reaches `size` entries."""

    def __init__(self, size: int):
        self.size = size
        self._memo: dict = {}

    def get(self, key: Hashable, obj: object, compute: Callable[[], T]) -> T:
        """The value cached under `key` for this very `obj`, else compute() stored there."""
        hit = self._memo.get(key)
        if hit is not None and hit[0] is obj:
            return hit[1]
        if len(self._memo) >= self.size:
            self._memo.clear()
        out = compute()
        self._memo[key] = (obj, out)
        return out

    def clear(self) -> None:
        self._memo.clear()
