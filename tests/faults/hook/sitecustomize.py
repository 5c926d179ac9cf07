"""Test hooks for the processes `xrun` starts, loaded by Python at start-up when a fault test puts
this folder on PYTHONPATH (the supervisor and every rank inherit it). Nothing in the runtime
knows about it: it wraps functions as their modules finish importing.

    XCOMPILE_FAULT_LOG=FILE    every rank appends what it reaches, one line each:
                                 forward RANK F N_IDS   its forward number F begins (1: prefill)
                                 enter RANK F C         its all_reduce number C of forward F
                                 hold RANK F C          it sleeps before that all_reduce
    XCOMPILE_FAULT_HOLD=R:F:C:S   rank R sleeps S seconds before all_reduce C of forward F
                                 (forward 0: the broadcasts before the first forward)
    XCOMPILE_PICKLE_GUARD=FILE pickle.load/loads/Unpickler and torch.load append
                                 "pickle NAME ..." to FILE and raise, in every process; at
                                 exit each process appends "modules PID NAME ..." (xcompile.*
                                 and pickle-loading libraries it imported)
"""

from __future__ import annotations

import importlib.abc
import os
import sys
import time


def _rank() -> int | None:
    try:
        return int(sys.argv[sys.argv.index("--rank") + 1])
    except (ValueError, IndexError):
        return None


def _log(path: str, line: str) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        os.write(fd, (line + "\n").encode())
    finally:
        os.close(fd)


class _PatchAfterImport(importlib.abc.MetaPathFinder):
    """Runs patches[name](module) right after module `name` has been executed."""

    def __init__(self, patches: dict):
        self.patches = patches

    def find_spec(self, name, path, target=None):
        if name not in self.patches:
            return None
        for finder in sys.meta_path:
            if finder is self or not hasattr(finder, "find_spec"):
                continue
            spec = finder.find_spec(name, path, target)
            if spec is not None:
                break
        else:
            return None
        run, patch = spec.loader.exec_module, self.patches[name]

        def exec_module(module):
            run(module)
            patch(module)

        spec.loader.exec_module = exec_module
        return spec


def _guard_pickle(log: str) -> dict:
    def refuse(name):
        def refused(*args, **kwargs):
            _log(log, f"pickle {name} pid {os.getpid()} {' '.join(sys.argv[:3])}")
            raise RuntimeError(f"{name} called while reading artifacts")

        return refused

    import _pickle
    import pickle

    for module in (pickle, _pickle):
        for name in ("load", "loads", "_load", "_loads"):
            if hasattr(module, name):
                setattr(module, name, refuse(f"{module.__name__}.{name}"))
        for name in ("Unpickler", "_Unpickler"):  # subclasses still work; loading does not
            if hasattr(module, name):
                base = getattr(module, name)
                guarded = type(name, (base,), {"load": refuse(f"{module.__name__}.{name}.load")})
                setattr(module, name, guarded)

    def patch_torch(module):
        module.load = refuse(f"{module.__name__}.load")

    def dump_modules():
        names = sorted(n for n in sys.modules if n.split(".")[0] in WATCHED_MODULES)
        _log(log, f"modules {os.getpid()} {' '.join(names)}")

    import atexit

    atexit.register(dump_modules)
    return {"torch": patch_torch, "torch.serialization": patch_torch}


# what the pickle guard lists at exit: our own modules (the test reads their source) and
# libraries that load pickles (none of which the runtime may import)
WATCHED_MODULES = {"xcompile", "transformers", "joblib", "dill", "cloudpickle", "pandas"}


def _hook_runtime(log: str, hold: str | None) -> dict:
    rank = _rank()
    # RANK:FORWARD:CALL:SECONDS -> (rank, forward, call, seconds)
    held = (
        tuple(float(x) if i == 3 else int(x) for i, x in enumerate(hold.split(":")))
        if hold
        else None
    )
    where = [0, 0]  # forward calls begun, all_reduce calls in the current forward

    def patch_model(module):
        forward = module.Model.forward

        def logged_forward(self, ids, *args, **kwargs):
            where[0], where[1] = where[0] + 1, 0
            _log(log, f"forward {rank} {where[0]} {len(ids)}")
            return forward(self, ids, *args, **kwargs)

        module.Model.forward = logged_forward

    def patch_comm(module):
        all_reduce = module.ShmComm.all_reduce

        def logged_all_reduce(self, x):
            where[1] += 1
            if held and held[:3] == (rank, where[0], where[1]):
                _log(log, f"hold {rank} {where[0]} {where[1]}")
                time.sleep(held[3])
            _log(log, f"enter {rank} {where[0]} {where[1]}")
            try:
                return all_reduce(self, x)
            except BaseException:
                _log(log, f"raised {rank} {where[0]} {where[1]} at {time.monotonic():.3f}")
                raise

        module.ShmComm.all_reduce = logged_all_reduce

    import atexit

    atexit.register(lambda: _log(log, f"exit {rank} at {time.monotonic():.3f}"))
    return {"xcompile.runtime.model": patch_model, "xcompile.runtime.comm": patch_comm}


_patches: dict = {}
if os.environ.get("XCOMPILE_PICKLE_GUARD"):
    _patches.update(_guard_pickle(os.environ["XCOMPILE_PICKLE_GUARD"]))
if os.environ.get("XCOMPILE_FAULT_LOG") and _rank() is not None:
    _patches.update(
        _hook_runtime(os.environ["XCOMPILE_FAULT_LOG"], os.environ.get("XCOMPILE_FAULT_HOLD"))
    )
if _patches:
    sys.meta_path.insert(0, _PatchAfterImport(_patches))
