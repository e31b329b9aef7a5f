"""Background reading and writing for the merge executor, so that I/O overlaps the arithmetic.

Both helpers keep at most `depth` items in flight, which bounds the memory they add. Torch
and the file syscalls release the GIL, so reader threads, the computing thread and a writer
thread run at once.
"""

from __future__ import annotations

import queue
import threading
from collections import deque
from collections.abc import Callable, Hashable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

_DONE = object()


class Prefetcher:
    """Reads a known sequence of tiles ahead of their use, delivered in order.

    `schedule` lists the keys in the order `take` will ask for them; `read(key)` loads one.
    `readers` reads run at once (a disk serves two outstanding requests faster than one), and
    at most `depth` tiles are read ahead, which bounds the memory they hold.
    """

    def __init__(
        self,
        schedule: Sequence[Hashable],
        read: Callable[[Any], Any],
        depth: int = 3,
        readers: int = 2,
    ) -> None:
        self._schedule = list(schedule)
        self._read = read
        self._depth = depth
        self._position = 0
        self._submitted = 0
        self._pending: deque[Future] = deque()
        self._pool = ThreadPoolExecutor(readers, thread_name_prefix="loramerge-read")
        self._fill()

    def _fill(self) -> None:
        while len(self._pending) < self._depth and self._submitted < len(self._schedule):
            key = self._schedule[self._submitted]
            self._pending.append(self._pool.submit(self._read, key))
            self._submitted += 1

    def take(self, key: Hashable) -> Any:
        if self._position >= len(self._schedule) or self._schedule[self._position] != key:
            raise RuntimeError(f"read {key!r} out of the planned order")
        self._position += 1
        found = self._pending.popleft()
        self._fill()
        return found.result()

    def close(self) -> None:
        for pending in self._pending:
            pending.cancel()
        self._pool.shutdown(wait=True)


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
