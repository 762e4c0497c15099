"""What the loaders do with bad data: `on_error="stop"` (default) raises DataError naming the file, entry index and
sample id; `on_error="skip"` logs the same message, leaves the sample out and counts it."""
from __future__ import annotations

import logging
from typing import Callable, Iterable

ON_ERROR = ("stop", "skip")
log = logging.getLogger("llava.data")


class DataError(ValueError):
    """A data file, entry or image is unusable; the message names the file, index / id and the problem."""


def check_on_error(on_error: str) -> str:
    if on_error not in ON_ERROR:
        raise ValueError(f"on_error={on_error!r}; valid: {', '.join(ON_ERROR)}")
    return on_error


def load_or_replace(load: Callable[[int], dict], candidates: Iterable[int], on_error: str,
                    give_up: Callable[[int], str]) -> dict:
    """The first of `candidates` (the asked-for index, then its replacements) that loads, with "skipped" = how many
    before it did not. With on_error="stop" the first DataError is raised; with "skip" it is logged and counted.
    When every candidate fails, DataError(give_up(skipped))."""
    skipped = 0
    for index in candidates:
        try:
            sample = load(index)
            sample["skipped"] = skipped
            return sample
        except DataError as e:
            if on_error == "stop":
                raise
            log.warning("%s (skipped)", e)
            skipped += 1
    raise DataError(give_up(skipped))
