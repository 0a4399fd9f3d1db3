"""glibc's malloc thresholds for training: keep freed blocks instead of returning them to the OS every step.

glibc serves an allocation above its mmap threshold (128 KiB at first, raised as blocks are freed,
at most 32 MiB) with its own mmap, unmapped when freed, and trims the heap's top once 128 KiB are
free there. A training step allocates and frees the same large activations every time, so each
step faults in fresh, zeroed pages from the OS. `keep_freed_memory` sets the mmap threshold to its
maximum and the trim threshold to 1 GiB (`mallopt`), once per process, at the first fit; the process
then keeps its heap instead of handing it back between steps. `bench/allocator.py` measures it
against glibc's defaults. `FINETUNE_MALLOPT=0` leaves the defaults; nothing happens off glibc.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import platform

__all__ = ['keep_freed_memory']

M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3  # glibc's <malloc.h>
MMAP_THRESHOLD_MAX = 32 << 20  # glibc's ceiling on 64-bit: larger blocks are always mmapped
TRIM_THRESHOLD = 1 << 30  # free memory at the heap's top before glibc returns it: 1 GiB
_state = {'tried': False, 'set': False}


def keep_freed_memory() -> bool:
    """Raise glibc's mmap threshold to 32 MiB and its trim threshold to 1 GiB, tried once per process; True if set."""
    if _state['tried']:
        return _state['set']
    if os.environ.get('FINETUNE_MALLOPT', '1') == '0' or platform.libc_ver()[0] != 'glibc':
        return False  # asked again at the next fit: the environment may change in a notebook
    _state['tried'] = True
    try:
        libc = ctypes.CDLL(ctypes.util.find_library('c') or 'libc.so.6')
        ok = libc.mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD_MAX) == 1
        _state['set'] = ok and libc.mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD) == 1
    except (OSError, AttributeError):
        pass
    return _state['set']
