"""Frontends: one file per model family, found by its place (no registry to edit).

Each family module declares `ARCHITECTURES` (the `architectures` values of config.json it reads)
and `spec(config) -> DecoderSpec`; optionally `REFUSED` (architecture -> why it is not compiled
and what to use instead). Adding a family is adding a file here.
"""

from __future__ import annotations

import importlib
import pkgutil
from types import ModuleType

_NOT_FAMILIES = {"graph", "decoder", "checkpoint"}


def families() -> dict[str, ModuleType]:
    """architecture name (e.g. LlamaForCausalLM) -> family module."""
    found = {}
    for info in pkgutil.iter_modules(__path__):
        if info.name in _NOT_FAMILIES or info.name.startswith("_"):
            continue
        module = importlib.import_module(f"{__name__}.{info.name}")
        for arch in getattr(module, "ARCHITECTURES", ()):
            found[arch] = module
    return found
