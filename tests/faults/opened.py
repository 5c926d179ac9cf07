"""Which files in some folders any process opened or read, by Linux inotify (ctypes): the proof
that a refusal read nothing outside the artifacts, whatever language did the reading (Python,
the safetensors or onnx C++ code, the tokenizers Rust code). stat() is no open: resolving a path
does not count, reading it does."""

from __future__ import annotations

import ctypes
import os
import struct
from pathlib import Path

IN_ACCESS, IN_OPEN = 0x1, 0x20
_EVENT = struct.Struct("iIII")  # wd, mask, cookie, len; then len bytes of name


class Opened:
    """with Opened([folder, ...]) as seen: ...; seen.names() -> files opened or read there."""

    def __init__(self, folders: list[Path]):
        self.libc = ctypes.CDLL(None, use_errno=True)
        self.fd = self.libc.inotify_init1(os.O_NONBLOCK | os.O_CLOEXEC)
        if self.fd < 0:
            raise OSError(ctypes.get_errno(), "inotify_init1")
        self.folders = {}
        for folder in folders:
            wd = self.libc.inotify_add_watch(self.fd, os.fsencode(folder), IN_OPEN | IN_ACCESS)
            if wd < 0:
                raise OSError(ctypes.get_errno(), f"inotify_add_watch {folder}")
            self.folders[wd] = Path(folder)
        self.seen: list[Path] = []

    def __enter__(self) -> Opened:
        return self

    def __exit__(self, *exc) -> None:
        self.names()
        os.close(self.fd)

    def names(self) -> list[Path]:
        """Every path opened or read in the watched folders so far (the folders themselves
        appear as their own path when listed)."""
        while True:
            try:
                data = os.read(self.fd, 65536)
            except BlockingIOError:
                break
            offset = 0
            while offset < len(data):
                wd, _mask, _cookie, length = _EVENT.unpack_from(data, offset)
                raw = data[offset + _EVENT.size : offset + _EVENT.size + length]
                name = raw.rstrip(b"\0").decode(errors="replace")
                path = self.folders[wd] / name if name else self.folders[wd]
                if path not in self.seen:
                    self.seen.append(path)
                offset += _EVENT.size + length
        return list(self.seen)
