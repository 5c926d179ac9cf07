import pytest

from xcompile import _C


@pytest.fixture(params=_C.supported_isas())
def isa(request) -> str:
    """Runs a test once per ISA path this CPU supports, restoring the previous path after."""
    before = _C.isa()
    _C.set_isa(request.param)
    yield request.param
    _C.set_isa(before)


@pytest.fixture
def threads() -> int:
    """Restores the kernels' thread count after a test that changes it."""
    before = _C.num_threads()
    yield before
    _C.set_num_threads(before)
