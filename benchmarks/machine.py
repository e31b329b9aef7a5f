"""The machine state a benchmark job starts from: page cache dropped or warm, memory settled.

Dropping the page cache emulates a model larger than memory. On a virtual machine whose guest
reports free memory back to its host (virtio-balloon free page reporting) it also starts
background work lasting many seconds: the guest hands the freed gigabytes to the host about 1
GB every two seconds, and a job running meanwhile competes with that traffic, while pages the
job allocates afterwards have to be faulted back in by the host. On the benchmark VM a cold
`cp` of 2.2 GB took anywhere from 1.6 s to 9.5 s depending only on how long ago memory had been
freed. `settle` waits until the reporting has gone quiet, so every job starts on the same, idle
machine: free memory handed back, nothing in flight. That is the state a VM like this sits in
between commands; it makes page-cache-heavy jobs pay for fresh pages, which is what they cost
there.
"""

from __future__ import annotations

import os
import time
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


# a counter the benchmark VM's kernel has; where it is missing, `settle` waits a fixed time
_REPORTED_KIB = Path("/sys/module/page_reporting/parameters/reported_kib")


def settle(quiet: float = 3.0, limit: float = 90.0) -> float:
    """Wait until free page reporting has been idle for `quiet` seconds (a fixed 10 s where the
    kernel does not count what it reported); returns the seconds waited."""
    if not free_page_reporting():
        return 0.0
    started = time.monotonic()
    if not _REPORTED_KIB.exists():
        time.sleep(10.0)
        return time.monotonic() - started
    last, still_since = _REPORTED_KIB.read_text(), time.monotonic()
    while time.monotonic() - still_since < quiet and time.monotonic() - started < limit:
        time.sleep(0.25)
        now = _REPORTED_KIB.read_text()
        if now != last:
            last, still_since = now, time.monotonic()
    return time.monotonic() - started
