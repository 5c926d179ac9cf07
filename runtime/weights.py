"""Where the weights live while running: the file's pages (mapped), or one anonymous block
backed by transparent huge pages (copied once at load).

Decode streams every weight once per token. From 4 KiB file pages it measured ~20 % slower on
the 1.1B BF16 model (148 vs 117 ms/token, same run) than from 2 MiB pages: a TLB miss and a
hardware-prefetch restart every 4 KiB. Resident memory is the same either way (touched mapped
pages count too); the copy costs one pass over the file at start and leaves the page cache's
copy reclaimable.
"""

from __future__ import annotations

import ctypes
import mmap

import torch

HUGE = 2 << 20
MADV_HUGEPAGE = 14
ALIGN = 64


def resident(weights: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Copy every tensor into one 2 MiB-aligned anonymous block advised for huge pages."""
    layout, total = {}, 0
    for name, t in weights.items():
        total = -(-total // ALIGN) * ALIGN
        layout[name] = total
        total += t.numel() * t.element_size()
    if total == 0:
        return dict(weights)
    size = -(-total // HUGE) * HUGE
    block = mmap.mmap(-1, size + HUGE, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    raw = torch.frombuffer(block, dtype=torch.uint8)
    start = (-raw.data_ptr()) % HUGE
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.madvise(ctypes.c_void_p(raw.data_ptr() + start), ctypes.c_size_t(size), MADV_HUGEPAGE)
    except (OSError, AttributeError):
        pass  # no madvise: ordinary pages, still correct
    out = {}
    for name, t in weights.items():
        nbytes = t.numel() * t.element_size()
        at = start + layout[name]
        view = raw[at : at + nbytes].view(t.dtype).view(t.shape) if nbytes else t.clone()
        if nbytes:
            view.copy_(t)
        out[name] = view
    return out
