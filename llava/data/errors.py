"""What the loaders do with bad data: `on_error="stop"` (default) raises DataError naming the file, entry index and
sample id; `on_error="skip"` logs the same message, leaves the sample out and counts it."""
from __future__ import annotations

import logging

ON_ERROR = ("stop", "skip")
log = logging.getLogger("llava.data")


class DataError(ValueError):
    """A data file, entry or image is unusable; the message names the file, index / id and the problem."""


def check_on_error(on_error: str) -> str:
    if on_error not in ON_ERROR:
        raise ValueError(f"on_error={on_error!r}; valid: {', '.join(ON_ERROR)}")
    return on_error
