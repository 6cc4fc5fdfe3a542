"""Progress bars for long steps, on stderr: live on a terminal, an update every 30 s in a log."""

from __future__ import annotations

import sys
from collections.abc import Iterable
from typing import TypeVar

from tqdm import tqdm

T = TypeVar("T")


def progress(items: Iterable[T], desc: str, unit: str, total: int | None = None) -> Iterable[T]:
    live = sys.stderr.isatty()
    return tqdm(items, desc=desc, unit=unit, total=total, dynamic_ncols=live, ascii=not live,
                mininterval=0.1 if live else 30.0, file=sys.stderr)
