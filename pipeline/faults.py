"""Named pause points for crash tests.

With EMBEDPIPE_PAUSE_AT=point[:n] and EMBEDPIPE_PAUSE_FILE=path in the environment, the n-th
time (default 1st) a process reaches `point` it creates the file and sleeps, so a test can send a
real SIGKILL at a known place. Only one process pauses: once the file exists, later hits (a
retried Ray worker, a rerun) go on. Without those variables a checkpoint costs one comparison.
"""
from __future__ import annotations

import os
import time
from collections import Counter

_TARGET = os.environ.get("EMBEDPIPE_PAUSE_AT", "")
_POINT, _, _NTH = _TARGET.partition(":")
_HITS: Counter = Counter()


def checkpoint(point: str) -> None:
    if point != _POINT:
        return
    _HITS[point] += 1
    if _HITS[point] == int(_NTH or 1):
        try:
            with open(os.environ["EMBEDPIPE_PAUSE_FILE"], "x") as handle:
                handle.write(str(os.getpid()))
        except FileExistsError:
            return
        while True:
            time.sleep(60)
