"""Build steps pyproject.toml cannot say (everything else is in pyproject.toml).

* The fused merge kernel (C, no dependencies) is an optional extension. It is built stripped (-g0, -s:
  ~0.1 MB instead of ~1 MB with the interpreter's -g). Without a C compiler or the Python headers it is
  left out *and said so*, and the wheel is then a pure `py3-none-any` one (not a cp3xx-linux wheel that
  lacks its extension); merges use the numpy path, about 2x slower, which `plan` and `merge` also print.
  -ffp-contract=off: no fused multiply-add, so every CPU writes the same merged bytes.
* The shipped recipes (recipes/*.yaml) go into the wheel as peftdeploy/data/recipes/, so
  `peftdeploy up demo` works from any directory.
"""
from __future__ import annotations

import os
import shlex
import shutil
import sys
import sysconfig
from pathlib import Path

from setuptools import Extension, setup
from setuptools.command.build_py import build_py

HERE = Path(__file__).resolve().parent
NO_KERNEL = ("peftdeploy: building WITHOUT the fused merge kernel ({why}); merges will use the numpy path "
             "(about 2x slower). Install a C compiler and the Python headers (e.g. apt-get install gcc "
             "python3-dev) and reinstall to get it.")


def _why_no_compiler() -> str | None:
    cc = os.environ.get("CC") or sysconfig.get_config_var("CC") or "cc"
    exe = shlex.split(cc)[0] if cc.strip() else "cc"
    if shutil.which(exe) is None:
        return f"no C compiler: {exe!r} is not on PATH"
    include = sysconfig.get_paths().get("include") or ""
    if not (Path(include) / "Python.h").is_file():
        return f"no Python headers: {include}/Python.h is missing"
    return None


class BuildPyWithRecipes(build_py):
    def run(self) -> None:
        super().run()
        src = HERE / "recipes"
        if src.is_dir():
            dst = Path(self.build_lib) / "peftdeploy" / "data" / "recipes"
            dst.mkdir(parents=True, exist_ok=True)
            for f in sorted(src.glob("*.yaml")):
                shutil.copyfile(f, dst / f.name)


why = _why_no_compiler()
ext_modules = []
if why is None:
    ext_modules.append(Extension(
        "peftdeploy.merge._kernels", ["peftdeploy/merge/_kernels.c"],
        extra_compile_args=["-O3", "-ffp-contract=off", "-Wno-psabi", "-g0"],
        extra_link_args=["-s"], optional=True))
else:
    print(NO_KERNEL.format(why=why), file=sys.stderr)

setup(ext_modules=ext_modules, cmdclass={"build_py": BuildPyWithRecipes})
