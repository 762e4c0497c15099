"""The thread that runs the model for `llava-pipeline serve`: a bounded queue in front of continuous batching.

Requests wait in the queue (`submit` refuses when it is full, so the server can answer 429 instead of letting waits
grow without bound). Between two decode steps the engine moves waiting requests into the batch, up to `max_batch`
rows: their images go through the vision tower together, their prompts are prefilled together, and they join the
running rows, which do not wait for the batch to drain. Every step then runs one forward pass for all rows; rows that finish leave at once, and
rows whose client went away (`cancel`) leave before the next step, so they stop costing compute.

Only this thread touches the model. Events go back to each request through the callback it brought
(`("text", delta)`, `("done", finish_reason, completion_tokens)` or `("error", message)`), which the web server turns
into asyncio queue puts.
"""
from __future__ import annotations

import collections
import logging
import threading
from dataclasses import dataclass, field
from typing import Callable

import torch

from llava.generate import BatchDecoder

log = logging.getLogger("llava.serve")


class QueueFull(Exception):
    """The queue holds `max_queue` waiting requests already."""


@dataclass(eq=False)
class Job:
    ids: list[int]  # prompt ids, IMAGE_TOKEN_INDEX where the image goes
    image: torch.Tensor | None  # preprocessed pixels [3, H, W]
    config: object  # llava.generate.GenerationConfig
    emit: Callable[[tuple], None]
    cancelled: bool = field(default=False, init=False)


class Engine:
    def __init__(self, loaded, max_batch: int = 16, max_queue: int = 64):
        if max_batch < 1 or max_queue < 0:
            raise ValueError(f"max_batch={max_batch} must be >= 1 and max_queue={max_queue} >= 0")
        self.loaded, self.max_batch, self.max_queue = loaded, max_batch, max_queue
        self.decoder = BatchDecoder(loaded.model.llm, loaded.tokenizer)
        self._pending: collections.deque[Job] = collections.deque()
        self._wake = threading.Condition()
        self._stopping = False
        self.peak_running = 0  # most rows seen generating together (GET /health)
        self.abandoned = 0  # requests dropped because their client went away
        self._thread = threading.Thread(target=self._run, name="llava-serve-engine", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        with self._wake:
            self._stopping = True
            self._wake.notify()
        self._thread.join()

    def submit(self, job: Job) -> None:
        with self._wake:
            if len(self._pending) >= self.max_queue:
                raise QueueFull
            self._pending.append(job)
            self._wake.notify()

    def queue_full(self) -> bool:
        with self._wake:
            return len(self._pending) >= self.max_queue

    def cancel(self, job: Job) -> None:
        job.cancelled = True  # read by the engine thread between steps

    def stats(self) -> dict:
        with self._wake:
            return {"running": len(self.decoder), "queued": len(self._pending), "peak_running": self.peak_running,
                    "abandoned": self.abandoned, "max_batch": self.max_batch, "max_queue": self.max_queue}

    # ---- the engine thread -----------------------------------------------------------------------------------------
    def _run(self) -> None:
        with torch.inference_mode():
            while True:
                with self._wake:
                    while not (self._stopping or self._pending or len(self.decoder)):
                        self._wake.wait()
                    if self._stopping:
                        return
                    joining = []
                    while self._pending and len(self.decoder) + len(joining) < self.max_batch:
                        job = self._pending.popleft()
                        if job.cancelled:
                            self.abandoned += 1
                        else:
                            joining.append(job)
                try:
                    self._step(joining)
                except Exception as e:  # noqa: BLE001 - one bad step must not take the server down
                    log.exception("generation failed")
                    for job in set(joining) | {row.key for row in self.decoder.rows}:
                        job.emit(("error", f"generation failed: {type(e).__name__}: {e}"))
                    self.decoder = BatchDecoder(self.loaded.model.llm, self.loaded.tokenizer)

    def _step(self, joining: list[Job]) -> None:
        model = self.loaded.model
        device = next(model.parameters()).device
        if joining:  # one pass of the vision tower and one prefill for all the requests that arrived
            images = [job.image for job in joining if job.image is not None]
            embeds, _ = model.prepare_inputs_embeds([torch.tensor(job.ids, device=device) for job in joining],
                                                    torch.stack(images).to(device) if images else None)
            self.decoder.add(embeds, [job.config for job in joining],
                             [lambda delta, job=job: job.emit(("text", delta)) for job in joining], joining)
        self.peak_running = max(self.peak_running, len(self.decoder))
        gone = [row for row in self.decoder.rows if row.key.cancelled]
        if gone:
            self.decoder.remove(gone)
            self.abandoned += len(gone)
        for row in self.decoder.step():
            row.key.emit(("done", row.finish_reason, len(row.ids)))
