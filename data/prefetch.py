"""Runs a generator in a daemon thread, a bounded number of items ahead; re-raises its errors in the
consumer, so a bad file read in the background still surfaces as the consumer's exception."""

from __future__ import annotations

import queue
import threading
from typing import Iterator


class Prefetcher:
    _END = object()

    def __init__(self, source: Iterator, depth: int):
        self.done = False
        self.queue: queue.Queue = queue.Queue(maxsize=depth)
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._run, args=(source,), daemon=True)
        self.thread.start()

    def _run(self, source: Iterator) -> None:
        try:
            for item in source:
                if not self._put(item):
                    return
            self._put(self._END)
        except BaseException as err:  # noqa: BLE001 - handed to the consumer, not swallowed
            self._put(err)

    def _put(self, item) -> bool:
        while not self.stop.is_set():
            try:
                self.queue.put(item, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def __iter__(self) -> "Prefetcher":
        return self

    def __next__(self):
        if self.done:
            raise StopIteration
        item = self.queue.get()
        if item is self._END:
            self.done = True
            raise StopIteration
        if isinstance(item, BaseException):
            self.done = True
            raise item
        return item

    def __del__(self) -> None:
        self.stop.set()
