"""torch, optional: the runtime runs on numpy and xcompile._C alone (`pip install xcompile`);
only --reference (every step on its torch reference) and --backend torch (torch.distributed)
need torch, which the compile extra installs."""

from __future__ import annotations

from types import ModuleType

from xcompile.errors import UserError

INSTALL = 'pip install "xcompile[compile]"'


def require_torch(why: str) -> ModuleType:
    """torch, imported now; without it one line naming `why` (the flag that needs it) and the
    install command, as a UserError (exit 2)."""
    try:
        import torch
    except ImportError as e:
        if e.name is not None and e.name.split(".")[0] != "torch":
            raise  # torch is installed but broken: its own error says more
        raise UserError(f"{why} needs torch, which is not installed: {INSTALL}") from None
    return torch
