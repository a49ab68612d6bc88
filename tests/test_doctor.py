"""`python -m fusedrl.doctor`: the report names the ops, and the error probe tells a clean error from a crash."""

from __future__ import annotations

import pytest

from fusedrl import doctor

pytestmark = pytest.mark.errors


def test_error_probe_reports_a_clean_error_from_this_build():
    line = doctor.error_probe()
    assert line.startswith("op errors: raised cleanly"), line
    assert "target ids must lie in [0, 11), got values in [99, 99]" in line


def test_error_probe_reports_a_crash_with_its_signal():
    line = doctor.error_probe("import os, signal; os.kill(os.getpid(), signal.SIGSEGV)")
    assert line.startswith("op errors: BROKEN") and "SIGSEGV" in line, line


def test_error_probe_reports_a_probe_that_did_not_raise():
    line = doctor.error_probe("print('no error')")
    assert line.startswith("op errors: BROKEN") and "exit 0" in line, line


def test_report_lists_every_op_and_the_probe():
    lines = doctor.report()
    assert any(line.startswith("  op fusedrl::fused_linear_logp:") and "CPU" in line for line in lines), lines
    assert sum(line.startswith("op errors:") for line in lines) == 1
