"""xrun --json says which kernel path ran: the CPU's best, or the one XCOMPILE_ISA forces."""

from tests.conftest import run_xrun
from xcompile import _C


def test_json_names_the_kernel_path(compiled):
    art = str(compiled("llama"))
    best = run_xrun([art, "--prompt", "Hello", "-n", "2"])
    assert best["isa"] == _C.supported_isas()[-1]
    forced = run_xrun([art, "--prompt", "Hello", "-n", "2"], env={"XCOMPILE_ISA": "scalar"})
    assert forced["isa"] == "scalar" and forced["tokens"] == best["tokens"]
