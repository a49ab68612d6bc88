"""The compiled op library shares the process's C++ runtime instead of carrying its own copy of libstdc++.

A copy (linked from libstdc++.a by a toolchain without the libstdc++.so link) turned every argument error into
SIGSEGV on the GPU machine (issue 8); cmake/SharedLibstdcxx.cmake prevents it, this checks the result.
"""

from __future__ import annotations

import shutil
import subprocess
import sys

import pytest

from fusedrl import _ext

pytestmark = [pytest.mark.errors,
              pytest.mark.skipif(not sys.platform.startswith("linux"), reason="ELF dynamic sections: Linux only")]


def _tool(name: str) -> str:
    path = shutil.which(name)
    if path is None:
        pytest.skip(f"`{name}` (binutils) is not installed, so the library's dynamic section cannot be read")
    return path


def test_library_needs_the_shared_libstdcxx():
    dynamic = subprocess.run([_tool("readelf"), "-d", str(_ext.library_path())], capture_output=True, text=True,
                             check=True).stdout
    assert "[libstdc++.so.6]" in dynamic, f"the op library does not load the shared libstdc++:\n{dynamic}"


def test_library_defines_no_cxx_runtime_symbols():
    defined = subprocess.run([_tool("nm"), "-D", "--defined-only", str(_ext.library_path())], capture_output=True,
                             text=True, check=True).stdout
    runtime = [line for line in defined.splitlines() if line.split()[-1] in ("__cxa_throw", "__cxa_begin_catch")]
    assert not runtime, f"the op library carries its own C++ runtime: {runtime}"
