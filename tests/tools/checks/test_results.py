"""The report: results grouped by section, the verdict line, the JSON form and the exit code."""

from __future__ import annotations

import json

from internvl.tools.checks import CheckResult, SetupReport, Status
from internvl.tools.checks.results import fail, ok, warn


def _report() -> SetupReport:
    results = [ok("Python", "3.11.9"), warn("GPUs", "no CUDA GPU visible"), fail("weights", "1 of 2 shards missing",
                                                                                 "download again")]  # fmt: skip
    for result, section in zip(results, ("Machine", "Machine", "Model")):
        result.section = section
    return SetupReport(results)


def test_text_groups_the_sections_and_ends_with_the_verdict():
    lines = _report().format_text().splitlines()
    assert lines[0] == "== Machine ==" and lines.count("== Machine ==") == 1
    assert lines[lines.index("== Model ==") + 1] == "❌ weights: 1 of 2 shards missing"
    assert lines[lines.index("== Model ==") + 2].strip() == "fix: download again"
    assert lines[-1] == "1 ok, 1 warnings, 1 failures: fix the ❌ items above before training."


def test_json_statuses_are_plain_strings():
    report = _report()
    as_json = json.loads(json.dumps(report.to_dict()))
    assert [check["status"] for check in as_json["checks"]] == ["ok", "warn", "fail"]
    assert as_json["ok"] is False and as_json["counts"] == {"ok": 1, "warn": 1, "fail": 1}
    assert report.exit_code == 1 and report.failures[0].name == "weights"
    assert SetupReport([CheckResult("Python", Status.OK, "3.11.9")]).exit_code == 0
