"""Background reading and writing for the merge executor, so that I/O overlaps the arithmetic.

Both helpers keep a bounded number of items in flight, which bounds the memory they add.
Torch and the file syscalls release the GIL, so reader threads, a preparing thread, the
computing thread and a writer thread run at once.
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
    """Reads a known sequence of tiles ahead of their use and prepares the next few, in order.

    `schedule` lists the keys in the order `take` will ask for them. Two stages run ahead of
    `take`: `read(key)` loads a tile as stored, on `readers` threads and up to `depth` tiles
    ahead (a disk serves many outstanding requests faster than one or two); `prepare(key, read)`
    turns a loaded tile into what `take` returns, on one thread of its own and only `prepared`
    tiles ahead. Preparing is where a tile grows (to float32, say), so keeping it close to use
    lets deep reading ahead cost little memory; the reading threads mostly wait on the disk,
    while preparing keeps a core busy.
    """

    def __init__(
        self,
        schedule: Sequence[Hashable],
        read: Callable[[Any], Any],
        prepare: Callable[[Any, Any], Any] | None = None,
        depth: int = 8,
        readers: int = 4,
        prepared: int = 2,
    ) -> None:
        self._schedule = list(schedule)
        self._read = read
        self._prepare = prepare
        self._depth = max(1, depth)
        self._prepared = max(1, min(prepared, self._depth))
        self._position = 0
        self._submitted = 0
        self._reads: deque[Future] = deque()  # the tiles from `position` on, as loaded
        self._ready: deque[Future] = deque()  # the first of those, prepared
        self._readers = ThreadPoolExecutor(readers, thread_name_prefix="loramerge-read")
        self._preparer = ThreadPoolExecutor(1, thread_name_prefix="loramerge-prepare")
        self._fill()

    def _fill(self) -> None:
        while len(self._reads) < self._depth and self._submitted < len(self._schedule):
            key = self._schedule[self._submitted]
            self._reads.append(self._readers.submit(self._read, key))
            self._submitted += 1
        while len(self._ready) < min(self._prepared, len(self._reads)):
            index = len(self._ready)
            key = self._schedule[self._position + index]
            self._ready.append(self._preparer.submit(self._finish, key, self._reads[index]))

    def _finish(self, key: Hashable, loaded: Future) -> Any:
        tile = loaded.result()
        return tile if self._prepare is None else self._prepare(key, tile)

    def take(self, key: Hashable) -> Any:
        if self._position >= len(self._schedule) or self._schedule[self._position] != key:
            raise RuntimeError(f"read {key!r} out of the planned order")
        found = self._ready.popleft()
        self._reads.popleft()
        self._position += 1
        self._fill()
        return found.result()

    def close(self) -> None:
        for pending in (*self._ready, *self._reads):
            pending.cancel()
        self._preparer.shutdown(wait=True)
        self._readers.shutdown(wait=True)


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
