"""Scratch arrays a thread keeps from one search to the next.

A full sparse scan writes a million float32 scores per query, a batch of
hybrid queries one such array per query; fresh arrays cost their page faults
(and, for arrays numpy asks huge pages for, the kernel's compaction:
measured 7 ms per 4 MB in a batch's 64 MB), as much as the scans
themselves. Each thread reuses its own arrays, so several threads may
search one index at once. Must never import the model.
"""

from __future__ import annotations

import math
import threading

import numpy as np


class ThreadBuffers(threading.local):
    """Named float32 arrays, one set per thread, grown on demand and never shrunk.

    >>> buffers = ThreadBuffers()
    >>> a = buffers.get("scores", (2, 3))
    >>> a.shape, buffers.get("scores", (6,)).base is a.base
    ((2, 3), True)
    """

    def __init__(self) -> None:
        self.arrays: dict[str, np.ndarray] = {}

    def get(self, name: str, shape: int | tuple[int, ...]) -> np.ndarray:
        """A C-contiguous float32 array of `shape`, its content left over from the thread's earlier use of
        `name` (the caller writes every element it reads)."""
        shape = (shape,) if isinstance(shape, int) else tuple(shape)
        size = math.prod(shape)
        array = self.arrays.get(name)
        if array is None or array.shape[0] < size:
            array = self.arrays[name] = np.empty(size, dtype=np.float32)
        return array[:size].reshape(shape)
