"""Progress bars for long work: shown on a terminal, silent when output goes to a log or a pipe."""

from collections.abc import Iterable
from typing import TypeVar

from tqdm.auto import tqdm

Item = TypeVar("Item")


def token_progress(total: int | None, description: str) -> tqdm:
    """A bar counting tokens (rate in tokens/s; an ETA when the total is known); ``update`` it per batch."""
    return tqdm(total=total, desc=description, unit="tok", unit_scale=True, disable=None)


def progress(items: Iterable[Item], description: str, unit: str = "it") -> Iterable[Item]:
    return tqdm(items, desc=description, unit=unit, disable=None)  # disable=None: off when not a TTY
