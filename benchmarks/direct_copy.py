"""Copy a folder with direct I/O: the disk's floor for a merge, whatever the page cache costs.

    python benchmarks/direct_copy.py SOURCE_FOLDER TARGET_FOLDER

Files of a block or more are read and written with O_DIRECT in 16 MB blocks, two reading
threads staying a few blocks ahead of two writing ones (as `loramerge merge` reads and
writes); smaller files are copied plainly. Where page cache is cheap this is slower than `cp`,
whose writeback runs deeper queues; where it is not (a VM that hands free memory back to its
host) it shows the disk alone.
"""

from __future__ import annotations

import mmap
import os
import queue
import shutil
import sys
import threading
from pathlib import Path

BLOCK = 4096
CHUNK = 16 << 20
IN_FLIGHT = 8
READERS = 2
WRITERS = 2


def copy_direct(source: Path, target: Path) -> None:
    size = source.stat().st_size
    if size < BLOCK:
        shutil.copyfile(source, target)
        return
    src = os.open(source, os.O_RDONLY | os.O_DIRECT)
    dst = os.open(target, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_DIRECT, 0o644)
    free: queue.Queue = queue.Queue()
    for _ in range(IN_FLIGHT):
        free.put(mmap.mmap(-1, CHUNK))
    filled: queue.Queue = queue.Queue()

    offsets: queue.Queue = queue.Queue()
    for offset in range(0, size, CHUNK):
        offsets.put(offset)
    for _ in range(READERS):
        offsets.put(None)

    def read() -> None:
        while (offset := offsets.get()) is not None:
            buffer = free.get()
            filled.put((buffer, offset, os.preadv(src, [buffer], offset)))

    def write() -> None:
        while (item := filled.get()) is not None:
            buffer, offset, count = item
            padded = -(-count // BLOCK) * BLOCK  # the last block is written whole, cut below
            os.pwritev(dst, [memoryview(buffer)[:padded]], offset)
            free.put(buffer)
        filled.put(None)  # for the other writers

    readers = [threading.Thread(target=read) for _ in range(READERS)]
    writers = [threading.Thread(target=write) for _ in range(WRITERS)]
    for thread in readers + writers:
        thread.start()
    for thread in readers:
        thread.join()
    filled.put(None)
    for thread in writers:
        thread.join()
    os.ftruncate(dst, size)
    os.close(src)
    os.close(dst)


def main() -> int:
    source, target = Path(sys.argv[1]), Path(sys.argv[2])
    target.mkdir()
    for path in sorted(source.iterdir()):
        if path.is_file():
            copy_direct(path, target / path.name)
    return 0


if __name__ == "__main__":
    sys.exit(main())
