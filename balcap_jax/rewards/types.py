"""Types shared by every reward component and judge backend.

A reward component maps a batch of `RewardItem`s to one `ComponentScore` per item. `value` is a float in
[0, 1], or NaN when the item could not be scored (judge down, unparsable answer, unreadable image): NaN is
carried into `rewards[P, G, K]` and excluded from advantage statistics, never read as 0.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Protocol, Sequence


@dataclasses.dataclass(frozen=True)
class RewardItem:
    """One caption to score.

    image: encoded image bytes (PNG/JPEG) or None for text-only components.
    image_id: stable id of the image (keys per-image caches such as the reference decomposition).
    references: one or more reference captions.
    caption: the generated caption.
    metadata: source-specific extras (e.g. ShapesWorld scene graph, multiple-choice questions).
    """

    image_id: str
    caption: str
    references: tuple[str, ...]
    image: bytes | None = None
    metadata: dict[str, Any] = dataclasses.field(default_factory=dict)


@dataclasses.dataclass(frozen=True)
class ComponentScore:
    """value in [0, 1] or NaN; record: what the judge said (claims, verdicts, raw text) for logs/debugging;
    errors: how many judge calls failed for this item (after retries)."""

    value: float
    record: dict[str, Any] = dataclasses.field(default_factory=dict)
    errors: int = 0

    @property
    def scored(self) -> bool:
        return not math.isnan(self.value)


class RewardComponent(Protocol):
    """A named reward component. Implementations may batch and run judge calls concurrently."""

    name: str

    async def score(self, items: Sequence[RewardItem]) -> list[ComponentScore]: ...
