"""The three stages of embedding units, each on its own thread, joined by bounded queues.

    prepare (read -> reject -> tokenize -> sort -> batch)  ->  encode (model)  ->  write
    thread (prepare.py)                                        caller's thread     thread (write.py)

Reading, tokenizing and writing hide behind the forward pass (the infinity pattern). Messages
(messages.py) flow one way; a unit's rows are sorted by token count inside a window of
`sort_window` rows and put back in input order by the writer before they are written.
"""
from __future__ import annotations

import threading
import time
from typing import Callable

import numpy as np

from ..encode.batching import Batch
from ..faults import checkpoint
from .messages import DONE, Channel, Encoded, Stats, Stop

STOP_SECONDS = 30  # how long an interrupted run waits for a stage to finish its current step


def encode_loop(inbox: Channel, outbox: Channel, encode: Callable[[Batch], np.ndarray],
                stats: Stats) -> None:
    """The model's stage: batches in, vectors out; every other message passes straight through."""
    while (item := inbox.get()) is not DONE:
        if isinstance(item, Batch):
            tick = time.perf_counter()
            vectors = encode(item)
            tokens = None
            if isinstance(vectors, tuple):  # token-level output: (vectors, per-token vectors)
                vectors, tokens = vectors
            stats.seconds["encode"] += time.perf_counter() - tick
            stats.real_tokens += item.real_tokens
            stats.padded_tokens += item.padded_tokens
            outbox.put(Encoded(item.positions, vectors, tokens))
            checkpoint("encode")
        else:
            outbox.put(item)
    outbox.put(DONE)


def run_stages(prepare: Callable[[Channel], None], encode: Callable[[Batch], np.ndarray],
               write: Callable[[Channel], None], stats: Stats, depth: int = 16) -> None:
    """Run prepare and write on threads and the encoder here; the first error stops all three."""
    stop = threading.Event()
    to_encoder, to_writer = Channel(stop, depth), Channel(stop, depth)
    errors: list[BaseException] = []

    def guarded(target: Callable[[], None]) -> Callable[[], None]:
        def body() -> None:
            try:
                target()
            except Stop:
                pass
            except BaseException as exc:  # carried to the caller's thread
                errors.append(exc)
                stop.set()
        return body

    threads = [threading.Thread(target=guarded(lambda: prepare(to_encoder)), name="prepare", daemon=True),
               threading.Thread(target=guarded(lambda: write(to_writer)), name="write", daemon=True)]
    for thread in threads:
        thread.start()
    try:
        guarded(lambda: encode_loop(to_encoder, to_writer, encode, stats))()
        for thread in threads:
            while thread.is_alive():
                thread.join(0.1)
                if errors:
                    stop.set()
    except BaseException:  # a signal (Ctrl-C, SIGTERM) while waiting: stop the stages first
        stop.set()
        for thread in threads:
            thread.join(STOP_SECONDS)
        raise
    if errors:
        raise errors[0]
