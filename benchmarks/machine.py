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

`fill_page_cache` is the other state a VM like this can start a job in without that traffic:
the files a job reads (the model, the Python environment) are evicted one by one and memory is
then filled with an unrelated cached file, as on a machine that streamed a model larger than
its memory. Nothing is freed, so nothing goes back to the host, and every page a job takes
comes from reclaiming clean cache, which is what a model larger than memory costs anywhere.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import sys
import sysconfig
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


_MEMINFO = Path("/proc/meminfo")
_FILL_CHUNK = 64 << 20


def memory_bytes(field: str = "MemTotal") -> int:
    for line in _MEMINFO.read_text().splitlines():
        if line.startswith(f"{field}:"):
            return int(line.split()[1]) * 1024
    raise KeyError(field)


def evict(paths: list[Path]) -> int:
    """Drop every file under `paths` from the page cache (pages mapped by running processes
    stay); works without root. Returns the files evicted."""
    count = 0
    for root in paths:
        files = [root] if root.is_file() else (p for p in root.rglob("*") if p.is_file())
        for path in files:
            try:
                fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
            except OSError:
                continue
            try:
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
                count += 1
            finally:
                os.close(fd)
    return count


def python_files(packages: tuple[str, ...] = ("loramerge", "loramerge_cli")) -> list[Path]:
    """The interpreter, its standard library, the folders packages are imported from, and
    `packages` wherever they live (an editable install keeps them in the source tree); never
    a whole system prefix such as /usr."""
    roots = {Path(sys.executable).resolve()}
    paths = sysconfig.get_paths()
    keys = ("stdlib", "platstdlib", "purelib", "platlib", "scripts")
    roots.update(Path(paths[key]) for key in keys)
    library = sysconfig.get_config_var("LDLIBRARY")
    if library:
        roots.add(Path(sysconfig.get_config_var("LIBDIR") or "/") / library)
    roots.update(Path(entry) for entry in sys.path if entry)
    for name in packages:
        spec = importlib.util.find_spec(name)
        if spec is not None and spec.origin:
            roots.add(Path(spec.origin).parent)
    found = {r.resolve() for r in roots if r.exists()}
    return sorted(r for r in found if not any(o != r and o in r.parents for o in found))


def make_filler(path: Path) -> bool:
    """A file of zeros 2 GiB larger than memory at `path` (kept if it is already that large);
    False where the disk has no room for it."""
    size = memory_bytes() + (2 << 30)
    if path.exists() and path.stat().st_size >= size:
        return True
    path.parent.mkdir(parents=True, exist_ok=True)
    if shutil.disk_usage(path.parent).free < size + (8 << 30):
        return False
    zeros = bytes(_FILL_CHUNK)
    with open(path, "wb") as handle:
        for _ in range(-(-size // _FILL_CHUNK)):
            handle.write(zeros)
        handle.flush()
        os.fsync(handle.fileno())
    return True


def fill_page_cache(filler: Path, cold: list[Path]) -> None:
    """Evict `cold` (and the Python installation) from the page cache, then read all of
    `filler`, which is larger than memory, so free memory ends up holding unrelated cache."""
    os.sync()
    evict([*cold, *python_files()])
    with open(filler, "rb", buffering=0) as handle:
        buffer = bytearray(_FILL_CHUNK)
        while handle.readinto(buffer):
            pass


def _busy_jiffies() -> int:
    """CPU time (all cores, in clock ticks) spent outside idle and iowait since boot."""
    fields = Path("/proc/stat").read_text().splitlines()[0].split()[1:]
    user, nice, system, _idle, _iowait, irq, softirq, steal = (int(f) for f in fields[:8])
    return user + nice + system + irq + softirq + steal


class OthersMeter:
    """How many cores other processes kept busy while a job ran: the machine's busy time
    minus the job's (its finished children) and this process's own."""

    def __init__(self) -> None:
        import resource

        self._resource = resource
        self._tick = os.sysconf("SC_CLK_TCK")
        self._start = self._sample()

    def _sample(self) -> tuple[float, float, float]:
        own = self._resource.getrusage(self._resource.RUSAGE_SELF)
        children = self._resource.getrusage(self._resource.RUSAGE_CHILDREN)
        mine = own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime
        return time.monotonic(), _busy_jiffies() / self._tick, mine

    def cores(self) -> float:
        now, busy, mine = self._sample()
        seconds = max(now - self._start[0], 1e-6)
        return max(0.0, (busy - self._start[1]) - (mine - self._start[2])) / seconds


def wait_quiet(cores: float = 0.25, window: float = 3.0, limit: float = 900.0) -> float:
    """Wait until other processes have kept fewer than `cores` cores busy for `window` seconds
    (at most `limit` seconds); returns what they used in the last window."""
    started = time.monotonic()
    while True:
        meter = OthersMeter()
        time.sleep(window)
        used = meter.cores()
        if used < cores or time.monotonic() - started > limit:
            return used


COLD_STATES = {
    "dropped": "vm.drop_caches, then the job at once (needs root)",
    "settled": "vm.drop_caches, then a wait until free page reporting is quiet (needs root)",
    "full": "the job's files and Python evicted, then memory filled with an unrelated cached "
    "file larger than memory, as after streaming a model larger than memory (needs disk room)",
}


def choose_cold_state(asked: str | None, filler: Path) -> str | None:
    """The cold state to run in: the one asked for, else `full` on a VM that reports free
    pages to its host and `dropped` elsewhere; None (warm only) where none is possible."""
    state = asked or ("full" if free_page_reporting() else "dropped")
    if state == "full":
        print(f"page cache filler, larger than memory (written once): {filler}", flush=True)
        if make_filler(filler):
            return state
        print("no disk room for the filler: dropping the page cache instead")
        state = "settled" if free_page_reporting() else "dropped"
    if can_drop_caches():
        return state
    print("cannot write vm.drop_caches (not root?): reporting warm figures only")
    return None


def start_cold(work: Path, state: str, filler: Path) -> None:
    """Put the machine in the cold state `state` (see COLD_STATES) before a job."""
    if state == "full":
        fill_page_cache(filler, [work])
    else:
        drop_caches()
    if state != "dropped":
        settle()
