"""Background reading and writing for the merge executor, so that I/O overlaps the arithmetic.

Both helpers keep at most `depth` items in flight, which bounds the memory they add. Torch
and the file syscalls release the GIL, so a reader thread, the computing thread (torch uses
every core) and a writer thread run at once.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Callable, Hashable, Sequence
from typing import Any

import torch

_DONE = object()


class Prefetcher:
    """Reads a known sequence of tensors ahead of their use, in order.

    `schedule` lists the keys in the order `take` will ask for them; `read(key)` loads one.
    """

    def __init__(
        self, schedule: Sequence[Hashable], read: Callable[[Any], torch.Tensor], depth: int = 2
    ) -> None:
        self._schedule = list(schedule)
        self._position = 0
        self._items: queue.Queue = queue.Queue(maxsize=depth)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, args=(read,), daemon=True)
        self._thread.start()

    def _run(self, read: Callable[[Any], torch.Tensor]) -> None:
        for key in self._schedule:
            if self._stop.is_set():
                return
            try:
                item: Any = (key, read(key), None)
            except BaseException as exc:
                item = (key, None, exc)
            while not self._stop.is_set():
                try:
                    self._items.put(item, timeout=0.1)
                    break
                except queue.Full:
                    continue
            if item[2] is not None:
                return

    def take(self, key: Hashable) -> torch.Tensor:
        if self._position >= len(self._schedule) or self._schedule[self._position] != key:
            raise RuntimeError(f"read {key!r} out of the planned order")
        self._position += 1
        found, value, error = self._items.get()
        if error is not None:
            raise error
        assert found == key and value is not None
        return value

    def close(self) -> None:
        self._stop.set()
        self._thread.join()


class AsyncWriter:
    """Runs write calls on one background thread, in submission order.

    The first failure is re-raised by the next `submit` or by `drain`; later calls are skipped.
    """

    def __init__(self, depth: int = 2) -> None:
        self._calls: queue.Queue = queue.Queue(maxsize=depth)
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while True:
            call = self._calls.get()
            if call is _DONE:
                return
            if self._error is None:
                function, args = call
                try:
                    function(*args)
                except BaseException as exc:
                    self._error = exc

    def submit(self, function: Callable[..., object], *args: object) -> None:
        if self._error is not None:
            raise self._error
        self._calls.put((function, args))

    def drain(self) -> None:
        """Wait for every submitted call; raise the first failure."""
        self._calls.put(_DONE)
        self._thread.join()
        if self._error is not None:
            raise self._error
