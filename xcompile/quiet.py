"""Imports that log at import time things that say nothing to our users (torchao's CUDA-only
extensions failing to load on a CPU machine, torch's deprecation notes, neural-compressor's
accelerator detection): run them with logging below ERROR switched off."""

from __future__ import annotations

import contextlib
import logging
import os


@contextlib.contextmanager
def quiet_imports():
    os.environ.setdefault("LOGLEVEL", "ERROR")  # neural-compressor's own logger
    logging.disable(logging.WARNING)
    try:
        yield
    finally:
        logging.disable(logging.NOTSET)
