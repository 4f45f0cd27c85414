"""Progress bars for long work: shown on a terminal, silent when output goes to a log or a pipe."""

import os
import sys
from collections.abc import Iterable
from typing import TypeVar

from tqdm.auto import tqdm

Item = TypeVar("Item")


def token_progress(total: int | None, description: str, shown: bool = True) -> tqdm:
    """A bar counting tokens (rate in tokens/s; an ETA when the total is known); ``update`` it per batch.
    ``shown=False``: never shown (a statistics worker other than rank 0)."""
    return tqdm(total=total, desc=description, unit="tok", unit_scale=True, disable=None if shown else True)


def byte_progress(total: int, description: str) -> tqdm:
    """A bar counting bytes of an upload or a download (throughput in B/s, an ETA); ``update`` it per chunk."""
    return tqdm(total=total, desc=description, unit="B", unit_scale=True, unit_divisor=1024, disable=None)


def progress(items: Iterable[Item], description: str, unit: str = "it") -> Iterable[Item]:
    return tqdm(items, desc=description, unit=unit, disable=None)  # disable=None: off when not a TTY


def no_bars_unless_terminal() -> None:
    """Turns off the libraries' own bars (transformers' "Loading weights", the hub's downloads) when stderr is
    not a terminal, as ours are, so that logs hold lines rather than bar redraws. An explicit
    HF_HUB_DISABLE_PROGRESS_BARS wins."""
    if sys.stderr.isatty():
        return
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")  # read when transformers is first imported
    if "transformers" in sys.modules and os.environ["HF_HUB_DISABLE_PROGRESS_BARS"] == "1":
        from transformers.utils import logging

        logging.disable_progress_bar()
