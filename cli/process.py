"""Process-wide settings the command line makes before any command imports torch."""

from __future__ import annotations

import ctypes
import os
import sys

from loramerge_cli import lazy_torch

# Idle OpenMP workers spin for a while after every parallel region by default; while the merge's
# reader and writer threads need the same cores that burns a third of the CPU time. Set before
# torch is imported (commands import it lazily); a user's own setting wins.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
# numpy's OpenBLAS starts a spinning thread per core; we only use numpy for elementwise work
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")


def _keep_freed_memory() -> None:
    """Let glibc reuse freed tile buffers instead of returning them to the OS after each tile:
    a merge allocates several MB per tile, and page-faulting them in anew costs more system
    time than the arithmetic."""
    if not sys.platform.startswith("linux"):
        return
    try:
        libc = ctypes.CDLL(None)
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return
    m_trim_threshold, m_mmap_threshold = -1, -3
    mallopt(m_mmap_threshold, 32 << 20)  # glibc's largest allowed value
    mallopt(m_trim_threshold, 1 << 30)


_keep_freed_memory()

# torch loads when a command first uses it, not when a module imports it (see lazy_torch)
lazy_torch.install()
