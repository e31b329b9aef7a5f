"""The machine state a benchmark job starts from: page cache dropped or warm, and fresh memory.

Dropping the page cache emulates a model larger than memory. On a virtual machine whose guest
reports free memory back to the host (virtio-balloon free page reporting), it also does
something a large model never does: every page it frees is handed to the host, and a job that
later needs fresh pages waits for the host to fault them back in. On the benchmark VM a `cp` of
2.2 GB then took 5-7 s (4-6 s of it system time) instead of 1.6 s, depending only on how
long ago the memory was freed. On a machine whose memory is full of page cache (the regime
the cold runs stand for) the kernel recycles resident pages instead. So where reporting is on,
`recycle_memory` touches and frees a few GB of anonymous memory right before each job: the
pages it frees are resident, and are the ones the job gets.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

_BALLOONS = Path("/sys/bus/virtio/drivers/virtio_balloon")
_FREE_PAGE_REPORTING_BIT = 5  # VIRTIO_BALLOON_F_REPORTING in the device's feature bits


def can_drop_caches() -> bool:
    try:
        with open("/proc/sys/vm/drop_caches", "w") as handle:
            handle.write("3\n")
        return True
    except OSError:
        return False


def drop_caches() -> None:
    os.sync()
    with open("/proc/sys/vm/drop_caches", "w") as handle:
        handle.write("3\n")


def warm(folder: Path) -> None:
    for path in sorted(folder.rglob("*")):
        if path.is_file():
            with open(path, "rb") as handle:
                while handle.read(64 << 20):
                    pass


def free_page_reporting() -> bool:
    """Whether a virtio balloon device reports this guest's free pages to the host."""
    try:
        devices = [d for d in _BALLOONS.iterdir() if d.name.startswith("virtio")]
    except OSError:
        return False
    for device in devices:
        try:
            features = (device / "features").read_text().strip()
        except OSError:
            continue
        if len(features) > _FREE_PAGE_REPORTING_BIT and features[_FREE_PAGE_REPORTING_BIT] == "1":
            return True
    return False


def free_memory() -> int:
    """MemFree in bytes: what can be touched without evicting the page cache."""
    with open("/proc/meminfo") as meminfo:
        for line in meminfo:
            if line.startswith("MemFree:"):
                return int(line.split()[1]) * 1024
    return 0


def recycle_memory(nbytes: int) -> int:
    """Touch up to `nbytes` of anonymous memory in a child process and free it; returns the
    bytes touched (at most MemFree less 1 GiB, so a warm page cache stays)."""
    nbytes = max(0, min(nbytes, free_memory() - (1 << 30)))
    if nbytes:
        toucher = (
            "import mmap, sys\n"
            "size = int(sys.argv[1]); chunk = b'\\1' * (64 << 20)\n"
            "area = mmap.mmap(-1, size)\n"
            "while area.tell() + len(chunk) <= size: area.write(chunk)\n"
        )
        subprocess.run([sys.executable, "-c", toucher, str(nbytes)], check=True)
    return nbytes
