"""Progress bars for long steps: on stderr, and only when it is a terminal (CI logs stay clean)."""

from __future__ import annotations

from collections.abc import Iterable
from typing import TypeVar

from tqdm import tqdm

T = TypeVar("T")


def progress(items: Iterable[T], desc: str, unit: str, total: int | None = None) -> Iterable[T]:
    return tqdm(items, desc=desc, unit=unit, total=total, leave=False, disable=None, dynamic_ncols=True)
