"""Make the shared helpers (memory_testlib.py) importable whatever pytest's import mode is."""

import sys
from pathlib import Path

_HERE = str(Path(__file__).resolve().parent)
if _HERE not in sys.path:
    sys.path.insert(0, _HERE)


import pytest  # noqa: E402
from memory_testlib import require_native  # noqa: E402


@pytest.fixture(params=["native", "eager"])
def loops(request):
    """Run a test with the memory's CPU chunk loops in C++ (titans.memory.native, the default) and
    with the eager PyTorch loops; the native case is skipped only where no C++ compiler exists."""
    from titans.memory import native

    if request.param == "native":
        require_native()
        yield "native"
        return
    native.native_chunks(False)
    try:
        yield "eager"
    finally:
        native.native_chunks(True)
