"""Shared CLI plumbing: error handling (exit 2, no traceback), --json output, consoles.

Every command module uses `@user_errors` so a PeftDeployError becomes a one/two-line message on
stderr (or a JSON object on stdout with --json) and exit code 2.
"""
from __future__ import annotations

import functools
import json
import sys
from typing import Any, Callable, TypeVar

import click

from .errors import PeftDeployError

F = TypeVar("F", bound=Callable[..., Any])

json_option = click.option("--json", "as_json", is_flag=True, help="Machine-readable JSON on stdout.")


def emit_json(obj: Any) -> None:
    click.echo(json.dumps(obj, indent=2, sort_keys=False, default=str))


def error_json(e: PeftDeployError) -> dict[str, Any]:
    """One shape for one error and for several: {"ok": false, "errors": [{error, fix, file, line, ...}]}."""
    d = e.to_dict()
    return {"ok": False, "errors": d["errors"] if "errors" in d else [d]}


def user_errors(fn: F) -> F:
    """Turn PeftDeployError into exit 2 with a readable message (JSON when --json was given)."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except PeftDeployError as e:
            if kwargs.get("as_json"):
                emit_json(error_json(e))
            else:
                click.echo(e.render(), err=True)
            sys.exit(e.exit_code)
        except KeyboardInterrupt:
            click.echo("interrupted", err=True)
            sys.exit(130)

    return wrapper  # type: ignore[return-value]


def stderr_console():
    from rich.console import Console

    return Console(stderr=True, highlight=False)


# Off a terminal (`| cat`, CI logs) rich would lay tables out for 80 columns and cut names: lay them out
# as wide as their content instead (COLUMNS, when set, still wins).
PIPE_WIDTH = 1000


def stdout_console():
    import os

    from rich.console import Console

    wide = not sys.stdout.isatty() and not os.environ.get("COLUMNS")
    return Console(highlight=False, width=PIPE_WIDTH if wide else None)


def check_byte_options(**opts: str | None) -> None:
    """Refuse a malformed size option (``gpu_memory="80GB?"``) before planning: one message naming it."""
    from .errors import PeftDeployError
    from .plan.memory import parse_bytes

    for name, val in opts.items():
        try:
            parse_bytes(val)
        except ValueError as e:
            raise PeftDeployError(f"--{name.replace('_', '-')}: {e}", fix="write e.g. 80GiB")
