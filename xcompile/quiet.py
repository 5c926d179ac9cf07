"""Third-party noise that says nothing to our users, switched off where it comes from.

- quiet_imports: imports that log at import time (torchao's CUDA-only extensions failing to load
  on a CPU machine, "Failed to load ..._C_mxfp8 ...", through Python logging's last-resort
  handler; torch's `_pytree` deprecation notes, "W... _pytree.py ...", through torch's logger;
  neural-compressor's accelerator detection) run with logging below ERROR switched off.
- quiet_progress: transformers' progress bars while loading and saving a model ("Converting and
  de-quantizing GGUF tensors", "Loading weights", "Writing model shards").

Errors still show: ERROR records, exceptions and anything written outside these blocks.
"""

from __future__ import annotations

import contextlib
import importlib
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


@contextlib.contextmanager
def quiet_progress():
    """transformers' (and the hub's) progress bars off for the block, as they were after."""
    from transformers.utils import logging as hf_logging

    # the GGUF loader takes tqdm.auto's bar itself, past transformers' switch: for the block it
    # gets transformers' own, which the switch turns off
    gguf_loader = importlib.import_module("transformers.modeling_gguf_pytorch_utils")
    bar = getattr(gguf_loader, "tqdm", None)
    was_enabled = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    if bar is not None:
        gguf_loader.tqdm = hf_logging.tqdm
    try:
        yield
    finally:
        if bar is not None:
            gguf_loader.tqdm = bar
        if was_enabled:
            hf_logging.enable_progress_bar()
