"""`peftdeploy validate` and `peftdeploy schema`."""
from __future__ import annotations

import json

import click
import yaml

from ..cli_common import emit_json, json_option, user_errors


@click.command("validate")
@click.argument("recipe", type=click.Path(dir_okay=False))
@click.option("--show", is_flag=True, help="Print the fully resolved recipe (extends merged, ${VAR} read, "
              "paths made absolute); secrets are shown as their ${VAR} reference.")
@json_option
@user_errors
def validate(recipe: str, show: bool, as_json: bool) -> None:
    """Check a recipe: syntax, schema, cross-field rules. Exit 2 on the first class of errors."""
    from ..recipe import load_recipe

    loaded = load_recipe(recipe)
    r = loaded.recipe
    if as_json:
        out = {"ok": True, "name": r.name, "hash": r.compute_hash(), "files": [str(f) for f in loaded.files],
               "notes": list(loaded.notes)}
        if show:
            out["recipe"] = r.public_dict()
        emit_json(out)
        return
    for note in loaded.notes:
        click.echo(f"note: {note}", err=True)
    if show:
        click.echo(yaml.safe_dump(r.public_dict(), sort_keys=False), nl=False)
    else:
        click.echo(f"ok: {recipe} (recipe {r.name}, {len(r.adapters)} adapter(s), policy {r.policy.mode})")


@click.command("schema")
@click.option("--out", type=click.Path(dir_okay=False), help="Write to this file instead of stdout.")
def schema(out: str | None) -> None:
    """Print the JSON Schema of recipes (for editors: `# yaml-language-server: $schema=...`)."""
    from ..recipe import json_schema

    text = json.dumps(json_schema(), indent=2)
    if out:
        from ..util import atomic_write_text

        atomic_write_text(out, text + "\n")
    else:
        click.echo(text)
