"""Binding a rank to its cores: the thread count must come from the cores it was given, not from
the importing thread's affinity, which libgomp narrows to one core (OMP_PROC_BIND) the moment
torch is imported. Reading the latter made `xrun` and `xrun --serve` run every kernel on one
thread unless --threads was given."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

PROBE = """
import os
from xcompile.runtime import launch
cores = sorted(os.sched_getaffinity(0))
launch.bind(cores)
import torch  # libgomp starts here and pins this thread to the first place
x = torch.randn(256, 256); x @ x
print(len(cores), len(os.sched_getaffinity(0)), launch.cores())
"""


@pytest.mark.skipif(len(os.sched_getaffinity(0)) < 2, reason="needs at least 2 cores")
def test_bound_process_counts_all_its_cores():
    env = {k: v for k, v in os.environ.items() if not k.startswith(("OMP_", "GOMP_"))}
    out = subprocess.run(
        [sys.executable, "-c", PROBE], capture_output=True, text=True, check=True, env=env
    ).stdout.split()
    allowed, thread_sees, counted = map(int, out)
    assert counted == allowed >= 2  # the thread itself may see 1 (libgomp's binding)
