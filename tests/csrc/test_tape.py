"""_C.Tape: kernel calls recorded once and run again from C++ (what replays use). A tape must do
exactly what the same calls from Python do, start positions filled in at each run, and refuse
what the Python bindings refuse."""

from __future__ import annotations

import pytest
import torch

from xcompile import _C


def test_a_tape_does_what_its_calls_do_with_starts_filled_in():
    gen = torch.Generator().manual_seed(0)
    x, w = torch.randn(3, 64, generator=gen), torch.rand(64, generator=gen) + 0.5
    src = torch.randn(2, 4, 16, generator=gen)  # (S, kv_heads, d)
    direct_norm, taped_norm = torch.empty(3, 64), torch.empty(3, 64)
    direct_cache, taped_cache = torch.zeros(2, 2, 4, 32, 16)  # (slots, kv, capacity, d)

    def kv_args(cache, start):
        return (src.data_ptr(), 64, cache.data_ptr(), 1, 2, start, 2, 4, 16, 32)

    tape = _C.Tape()
    tape.add("rmsnorm", (x.data_ptr(), w.data_ptr(), taped_norm.data_ptr(), 3, 64, 1e-5))
    tape.add("kv_write", kv_args(taped_cache, 0), [(5, 0)])  # argument 5: start position 0
    assert len(tape) == 2
    for start in (0, 7, 30):
        tape.run([start])
        _C.rmsnorm(x.data_ptr(), w.data_ptr(), direct_norm.data_ptr(), 3, 64, 1e-5)
        _C.kv_write(*kv_args(direct_cache, start))
        assert torch.equal(taped_norm, direct_norm)
        assert torch.equal(taped_cache, direct_cache)
    assert torch.equal(direct_cache[1, :, 30:32], src.transpose(0, 1))


def test_a_tape_refuses_what_the_bindings_refuse():
    cache = torch.zeros(1, 1, 8, 4)
    tape = _C.Tape()
    with pytest.raises(ValueError, match="no kernel"):
        tape.add("no_such_kernel", ())
    with pytest.raises(ValueError, match="arguments"):
        tape.add("rmsnorm", (0, 0, 0))
    with pytest.raises(ValueError, match="start"):
        tape.add("kv_write", (0,) * 10, [(10, 0)])  # no argument 10
    src = torch.zeros(4)
    tape.add("kv_write", (src.data_ptr(), 4, cache.data_ptr(), 0, 1, 0, 1, 1, 4, 8), [(5, 0)])
    tape.run([7])  # position 7 of 8: fine
    with pytest.raises(ValueError, match="outside the cache"):
        tape.run([8])
    with pytest.raises(ValueError, match="start"):
        tape.run([])
