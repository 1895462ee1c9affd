"""Progress bars for the builder's long steps (tqdm), silenced by --quiet."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

from tqdm import tqdm


class Progress:
    """Makes byte-counting progress bars, or silent ones when quiet."""

    def __init__(self, quiet: bool = False) -> None:
        self.quiet = quiet

    @contextmanager
    def bar(self, description: str, total: int | None) -> Iterator[tqdm]:
        with tqdm(total=total, desc=description, unit="B", unit_scale=True, unit_divisor=1024,
                  disable=self.quiet, leave=True, dynamic_ncols=True) as bar:
            yield bar

    def note(self, message: str) -> None:
        if not self.quiet:
            tqdm.write(message)
