"""Weights copied into huge pages (runtime/weights.py): the background copy that xrun starts
before importing the rest gives the same arrays as the file, and its errors reach the caller."""

from __future__ import annotations

import shutil

import numpy as np
import pytest

from xcompile.artifacts import map_tensors
from xcompile.errors import UserError
from xcompile.runtime import weights
from xcompile.runtime.arrays import ptr


@pytest.mark.parametrize("readers", [1, 2, 5])
@pytest.mark.parametrize("background", [False, True])
def test_copied_weights_equal_the_files_tensors(compiled, background, readers, monkeypatch):
    monkeypatch.setattr(weights, "READERS", readers)  # threads sharing the file's tensors
    shard = compiled("llama", "int4") / "rank0.safetensors"
    if background:
        weights.start_copy(shard)
    copied = weights.resident(shard)
    mapped = dict(map_tensors(shard))
    assert copied.keys() == mapped.keys()
    for name, tensor in mapped.items():
        assert copied[name].dtype == tensor.dtype and copied[name].shape == tensor.shape, name
        assert np.array_equal(copied[name].view(np.uint8), tensor.view(np.uint8)), name
        assert ptr(copied[name]) % 64 == 0  # every tensor on a cache line
    assert weights._key(shard) not in weights._pending  # resident took the background copy


def test_a_copy_nobody_takes_is_dropped(compiled):
    shard = compiled("llama", "int4") / "rank0.safetensors"
    weights.start_copy(shard)
    copy = weights._pending[weights._key(shard)]
    weights.cancel_copy(shard)
    copy.thread.join()
    assert weights._key(shard) not in weights._pending and copy.cancelled


def test_a_truncated_shard_fails_in_the_caller_not_the_thread(compiled, tmp_path):
    shard = tmp_path / "rank0.safetensors"
    shutil.copy(compiled("llama", "int4") / "rank0.safetensors", shard)
    with open(shard, "r+b") as f:
        f.truncate(shard.stat().st_size - 100)
    weights.start_copy(shard)
    with pytest.raises(UserError, match="truncated"):
        weights.resident(shard)


def test_readers_split_the_tensors_in_file_order_into_runs_of_about_equal_bytes():
    class Info:
        def __init__(self, nbytes):
            self.nbytes = nbytes

    tensors = [(f"t{i}", Info(n)) for i, n in enumerate([5, 1, 1, 1, 8, 2, 2])]
    for parts in (1, 2, 3, 7, 10):
        runs = weights._split(tensors, parts)
        assert [t for run in runs for t in run] == tensors  # every tensor once, in order
        assert 1 <= len(runs) <= min(parts, len(tensors)) and all(runs)
    assert [sum(i.nbytes for _, i in run) for run in weights._split(tensors, 2)] == [8, 12]
