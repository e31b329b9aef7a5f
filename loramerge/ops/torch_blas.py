"""torch's own float32 matrix product, called on numpy arrays without importing torch.

torch computes float32 products on the CPU with the BLAS it was built with: its CPU library
(libtorch_cpu) holds MKL on x86-64 and exports MKL's Fortran `sgemm_`, which torch's `mm` and
`addmm_` call. Calling that very function with the arguments torch passes gives torch's bits
without torch's 1-2 s of Python start-up, because the library loads in about 0.2 s.
`loramerge.model.fast_checks` confirms on each machine, against torch itself, that the bits are
the same before anything relies on it; where the library or the symbols are missing, `load`
returns None and merges take torch's path.
"""

from __future__ import annotations

import ctypes
import functools
import importlib.util
import os
import sys
import threading
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import numpy

_LIBRARIES = {"linux": "libtorch_cpu.so"}


class TorchBlas:
    """`sgemm_` and MKL's per-thread thread count, from torch's CPU library."""

    def __init__(self, library: ctypes.CDLL) -> None:
        self._sgemm = library.sgemm_
        self._sgemm.restype = None
        self._threads = library.MKL_Set_Num_Threads_Local
        self._threads.argtypes = [ctypes.c_int]
        self._threads.restype = ctypes.c_int

    def set_threads(self, count: int) -> None:
        """Threads MKL uses for the calling thread's products (0: its default)."""
        self._threads(count)

    def addmm(self, out: numpy.ndarray, lora_b: numpy.ndarray, lora_a: numpy.ndarray, beta: float):
        """out = beta * out + B @ A for row-major float32 arrays: B (m x k), A (k x n), out
        (m x n); rows may be strided (views of rows of larger arrays), elements contiguous.
        With beta 0 `out` is only written."""
        import numpy  # here, not at the top: loading the library needs no numpy

        rows, inner = lora_b.shape
        columns = lora_a.shape[1]
        if lora_a.shape[0] != inner or out.shape != (rows, columns):
            raise ValueError(f"shapes {lora_b.shape} @ {lora_a.shape} -> {out.shape}")
        for array in (out, lora_b, lora_a):
            if array.dtype != numpy.float32 or (array.size and array.strides[1] != 4):
                raise ValueError("float32 arrays with contiguous rows expected")
        if not rows or not columns:
            return out
        if not inner:
            out *= beta
            return out
        # row-major C = B @ A is column-major C^T = A^T @ B^T: the call torch makes
        no = ctypes.c_char(b"N")
        self._sgemm(
            ctypes.byref(no), ctypes.byref(no),
            _int(columns), _int(rows), _int(inner), _float(1.0),
            lora_a.ctypes.data_as(ctypes.c_void_p), _int(_leading(lora_a)),
            lora_b.ctypes.data_as(ctypes.c_void_p), _int(_leading(lora_b)),
            _float(beta), out.ctypes.data_as(ctypes.c_void_p), _int(_leading(out)),
        )  # fmt: skip
        return out


def _leading(array: numpy.ndarray) -> int:
    return max(1, array.strides[0] // 4, array.shape[1])


def _int(value: int) -> ctypes._Pointer:
    return ctypes.byref(ctypes.c_int(value))


def _float(value: float) -> ctypes._Pointer:
    return ctypes.byref(ctypes.c_float(value))


def library_path() -> Path | None:
    """Where torch's CPU library is, found without importing torch."""
    name = _LIBRARIES.get(sys.platform)
    spec = importlib.util.find_spec("torch") if name else None
    if name is None or spec is None or not spec.submodule_search_locations:
        return None
    found = Path(spec.submodule_search_locations[0]) / "lib" / name
    return found if found.is_file() else None


_PRELOADING: list[threading.Thread] = []


def preload() -> None:
    """Start loading torch's CPU library on a thread of its own (about 0.2 s): libc's dlopen
    called through ctypes releases the GIL, which ctypes' own loading does not."""
    path = library_path()
    if path is None or _PRELOADING:
        return
    try:
        dlopen = ctypes.CDLL(None).dlopen
    except (OSError, AttributeError):
        return
    dlopen.argtypes, dlopen.restype = [ctypes.c_char_p, ctypes.c_int], ctypes.c_void_p
    mode = os.RTLD_NOW | os.RTLD_GLOBAL
    thread = threading.Thread(target=dlopen, args=(str(path).encode(), mode), daemon=True)
    _PRELOADING.append(thread)
    thread.start()


@functools.cache
def load() -> TorchBlas | None:
    """torch's BLAS, loaded once; None where it cannot be found or lacks the symbols."""
    path = library_path()
    if path is None:
        return None
    for thread in _PRELOADING:
        thread.join()
    try:
        # global, as torch's own loader makes it: torch imported later finds it loaded
        return TorchBlas(ctypes.CDLL(str(path), mode=os.RTLD_GLOBAL))
    except (OSError, AttributeError):
        return None
