"""The main job's checks and reports fail loudly: a NaN error is a failure, never a pass
(``bench/interpreter_check.py``, ``bench/report.py``), and a failing host timer is reported
while the kernel check still decides the exit code (``bench/__main__.py``)."""

from __future__ import annotations

import json
import math
from unittest import mock

import pytest


@pytest.mark.parametrize("errors", [{"W_sn": 1e-7, "sigma": math.nan}, {"W_sn": math.nan, "sigma": 1e-7},
                                    {"W_sn": 1e-7, "sigma": 1.0}])
def test_interpreter_check_fails_a_case_with_a_nan_or_large_error(errors):
    """A case whose error is NaN anywhere (a kernel that never wrote sigma leaves the buffer's
    NaN) or above the tolerance fails, and the worst error reported is that one (found in
    review: ``max`` passed over a NaN that was not first)."""
    from bench import interpreter_check

    cases = [("good", lambda: {"W_sn": 1e-8}), ("bad", lambda: dict(errors))]
    with mock.patch.object(interpreter_check, "cases", lambda: cases), \
            mock.patch.object(interpreter_check, "_check_environment", lambda: None):
        check = interpreter_check.run()
    assert [c["ok"] for c in check["cases"]] == [True, False] and not check["ok"]
    worst = check["cases"][1]["max_rel_err"]
    assert (math.isnan(worst) if any(map(math.isnan, errors.values())) else worst == 1.0), worst
    assert "1/2 cases" in check["summary"]


def test_report_lists_a_nan_first_read():
    """A first read whose error against PyTorch's is NaN is an error line, as one above the
    tolerance is; one within it and one not compared (None) are not."""
    from bench import report

    rows = [dict(shape="128x1152", dtype="fp32", n=1, impl=impl, rel_err_vs_torch=err)
            for impl, err in (("a", math.nan), ("b", 1e-3), ("c", 1e-6), ("d", None))]
    lines = report.error_lines({"layers": rows})
    assert [line.split(":")[0].split()[-1] for line in lines] == ["a", "b"], lines


def test_interpreter_check_main_reports_a_failing_host_timer(tmp_path):
    """The CPU main job's child process: a host timer that raises is recorded in the JSON and
    does not fail the kernel check (found in review: a NameError made it fail the whole job)."""
    from bench import __main__ as main_mod
    from bench import host_time, interpreter_check

    path = tmp_path / "check.json"
    with mock.patch.object(interpreter_check, "run", lambda: dict(ok=True, summary="1/1", cases=[])), \
            mock.patch.object(host_time, "measure", side_effect=RuntimeError("timer broke")):
        assert main_mod.interpreter_check_main(str(path)) == 0
    check = json.loads(path.read_text())
    assert "timer broke" in check["host_time"]["error"]
