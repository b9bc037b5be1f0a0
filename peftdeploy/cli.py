"""The `peftdeploy` command line: a thin shell over one function per stage.

Commands are imported lazily so `peftdeploy --help`, `validate` and `plan` never import torch or
vLLM (they start in well under a second).
"""
from __future__ import annotations

import importlib

import click

from . import __version__

# command name -> "module:attribute" (imported on first use)
COMMANDS: dict[str, tuple[str, str]] = {
    "validate": ("peftdeploy.commands.recipe_cmds:validate", "Check a recipe and print errors with file:line."),
    "schema": ("peftdeploy.commands.recipe_cmds:schema", "Print the recipe JSON Schema."),
    "plan": ("peftdeploy.plan.cli:plan_cmd", "Inspect adapters, derive vLLM settings, print the plan."),
    "merge": ("peftdeploy.merge.cli:merge_cmd", "Merge the recipe's adapters into the backbone (cached)."),
    "up": ("peftdeploy.launch.cli:up_cmd", "Plan, merge if needed, and run the OpenAI-compatible server."),
    "down": ("peftdeploy.launch.cli:down_cmd", "Stop a deployment started with `up --detach`."),
    "status": ("peftdeploy.launch.cli:status_cmd", "Health and per-adapter metrics of running deployments."),
    "render": ("peftdeploy.render.cli:render_cmd", "Render manifests for Kubernetes, KServe, Ray Serve, ..."),
    "bench": ("peftdeploy.bench.cli:bench_cmd", "Load-test a deployment (Zipf adapters, Poisson arrivals)."),
    "eval": ("peftdeploy.commands.eval_cmd:eval_cmd", "Perplexity of the merged model, full precision vs quantized."),
    "demo": ("peftdeploy.commands.demo_cmd:demo_cmd", "Build the embedded demo model (offline)."),
}


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
            @click.command(name, help=COMMANDS[name][1])
            def unavailable() -> None:
                raise click.ClickException(f"`peftdeploy {name}` is not available in this installation ({e})")

            return unavailable

    def format_commands(self, ctx: click.Context, formatter: click.HelpFormatter) -> None:
        rows = [(n, h) for n, (_, h) in COMMANDS.items()]
        with formatter.section("Commands"):
            formatter.write_dl(rows)


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
