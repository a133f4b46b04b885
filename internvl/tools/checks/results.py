"""What a check finds: a ``CheckResult`` (ok, warning, or failure with the fix), and the ``SetupReport`` of a run."""

from __future__ import annotations

import dataclasses
import enum
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

from internvl.tools.resource_estimates import GIB, DiskEstimate, MemoryEstimate

# Longest list of problems one message names; the rest are counted.
MAX_LISTED = 5


class Status(str, enum.Enum):
    """A str, so that ``--json`` writes ``"ok"``, ``"warn"`` or ``"fail"``."""

    OK = "ok"
    WARN = "warn"
    FAIL = "fail"

    @property
    def symbol(self) -> str:
        return {Status.OK: "✅", Status.WARN: "⚠️ ", Status.FAIL: "❌"}[self]


@dataclass
class CheckResult:
    name: str
    status: Status
    message: str
    fix: str | None = None
    section: str = ""

    def format(self) -> str:
        line = f"{self.status.symbol} {self.name}: {self.message}"
        if self.fix:
            line += f"\n     fix: {self.fix}"
        return line


def ok(name: str, message: str) -> CheckResult:
    return CheckResult(name, Status.OK, message)


def warn(name: str, message: str, fix: str | None = None) -> CheckResult:
    return CheckResult(name, Status.WARN, message, fix)


def fail(name: str, message: str, fix: str) -> CheckResult:
    return CheckResult(name, Status.FAIL, message, fix)


def failed(results: Sequence[CheckResult]) -> bool:
    return any(result.status == Status.FAIL for result in results)


@dataclass
class SetupReport:
    results: list[CheckResult] = field(default_factory=list)
    memory_estimate: MemoryEstimate | None = None
    disk_estimate: DiskEstimate | None = None

    @property
    def failures(self) -> list[CheckResult]:
        return [r for r in self.results if r.status == Status.FAIL]

    @property
    def exit_code(self) -> int:
        return 1 if self.failures else 0

    def counts(self) -> dict[str, int]:
        return {status.value: sum(r.status == status for r in self.results) for status in Status}

    def format_text(self) -> str:
        lines, section = [], None
        for result in self.results:
            if result.section != section:
                section = result.section
                lines.append(f"\n== {section} ==")
            lines.append(result.format())
        counts = self.counts()
        verdict = "ready to train" if not counts["fail"] else "fix the ❌ items above before training"
        lines.append(f"\n{counts['ok']} ok, {counts['warn']} warnings, {counts['fail']} failures: {verdict}.")
        return "\n".join(lines).lstrip("\n")

    def to_dict(self) -> dict[str, Any]:
        return {
            "ok": not self.failures,
            "counts": self.counts(),
            "checks": [dict(dataclasses.asdict(r), status=r.status.value) for r in self.results],
            "memory_estimate": self.memory_estimate.to_dict() if self.memory_estimate else None,
            "disk_estimate": self.disk_estimate.to_dict() if self.disk_estimate else None,
        }


# -- Wording and reading helpers shared by the check families ------------------------------------------------------


def listing(items: Sequence[str]) -> str:
    shown = "; ".join(items[:MAX_LISTED])
    return shown + (f" (and {len(items) - MAX_LISTED} more)" if len(items) > MAX_LISTED else "")


def size(num_bytes: float) -> str:
    if num_bytes >= GIB:
        return f"{num_bytes / GIB:.1f} GiB"
    return f"{num_bytes / 2**20:.1f} MiB"


def read_json(path: Path) -> tuple[Any, str | None]:
    """``(value, None)``, or ``(None, "file:line:col: reason")`` for a file that is not valid JSON."""
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f), None
    except json.JSONDecodeError as error:
        return None, f"{path}:{error.lineno}:{error.colno}: {error.msg}"
    except (OSError, UnicodeDecodeError) as error:
        return None, f"{path}: {error}"
