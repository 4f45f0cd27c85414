"""Progress bars for long work: shown on a terminal, silent when output goes to a log or a pipe."""

from collections.abc import Iterable
from typing import TypeVar

from tqdm.auto import tqdm

Item = TypeVar("Item")


def progress(items: Iterable[Item], description: str, unit: str = "it") -> Iterable[Item]:
    return tqdm(items, desc=description, unit=unit, disable=None)  # disable=None: off when not a TTY
