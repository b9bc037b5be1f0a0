"""Errors and findings shared by every stage.

A *user error* is something the person running peftdeploy can fix (a recipe typo, a missing file,
an incompatible adapter). It carries where it happened and what would be right, the CLI prints it
in one or two lines and exits with code 2 — never a traceback.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from enum import Enum
from typing import Any

# Exit codes (README "Exit codes"): 0 ok (also "nothing to do", e.g. `down` of a deployment that is not
# running); 1 a runtime failure (the vLLM server failed to start, died, or was not ready in time);
# 2 a user error (usage, recipe, sources, plan errors, a missing extra); 128+N killed by signal N.
EXIT_OK = 0
EXIT_RUNTIME_FAILURE = 1
EXIT_USER_ERROR = 2


@dataclass(frozen=True)
class Location:
    """Where in a user's file something is (1-based line/column)."""

    file: str | None = None
    line: int | None = None
    column: int | None = None
    path: str | None = None  # dotted field path, e.g. "adapters[1].name"

    def __str__(self) -> str:
        parts = []
        if self.file:
            pos = self.file
            if self.line:
                pos += f":{self.line}"
                if self.column:
                    pos += f":{self.column}"
            parts.append(pos)
        if self.path:
            parts.append(self.path)
        return ": ".join(parts)


class PeftDeployError(Exception):
    """Base class of errors the user can act on (exit code 2)."""

    exit_code = EXIT_USER_ERROR

    def __init__(self, message: str, *, fix: str | None = None, location: Location | None = None):
        super().__init__(message)
        self.message = message
        self.fix = fix
        self.location = location

    def render(self) -> str:
        head = f"{self.location}: " if self.location and str(self.location) else ""
        text = f"error: {head}{self.message}"
        if self.fix:
            text += f"\n  fix: {self.fix}"
        return text

    def to_dict(self) -> dict[str, Any]:
        loc = self.location or Location()
        return {
            "error": self.message,
            "fix": self.fix,
            "file": loc.file,
            "line": loc.line,
            "column": loc.column,
            "path": loc.path,
        }


class RecipeError(PeftDeployError):
    """The recipe (or a file it extends) is malformed."""


class SourceError(PeftDeployError):
    """A model or adapter source cannot be resolved (missing path, bad hash, offline hub miss)."""


class PlanError(PeftDeployError):
    """Planning found error-severity findings; `findings` lists them."""

    def __init__(self, message: str, findings: list["Finding"] | None = None, **kw: Any):
        super().__init__(message, **kw)
        self.findings = findings or []


class MergeError(PeftDeployError):
    """An adapter cannot be merged exactly (DoRA, shape mismatch, ...)."""


class LaunchError(PeftDeployError):
    """`up` cannot start: port in use, a missing merged model, ...; the message holds cause and fix."""


class ServerFailure(LaunchError):
    """vLLM failed to start, died, or was not ready in time: a runtime failure (exit 1), not the user's
    input; the message holds the cause in one paragraph and the log path."""

    exit_code = EXIT_RUNTIME_FAILURE


class Severity(str, Enum):
    INFO = "info"
    WARNING = "warning"
    ERROR = "error"


@dataclass(frozen=True)
class Finding:
    """One thing planning noticed: data, printed by the CLI, returned by --json and the plugin."""

    code: str  # stable identifier, e.g. "rank-not-supported"
    severity: Severity
    message: str
    fix: str | None = None
    subject: str | None = None  # adapter name, "backbone", "serving", ...
    location: Location | None = None
    data: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        d: dict[str, Any] = {
            "code": self.code,
            "severity": self.severity.value,
            "message": self.message,
            "fix": self.fix,
            "subject": self.subject,
        }
        if self.location:
            d["location"] = str(self.location)
        if self.data:
            d["data"] = self.data
        return d
