"""`peftdeploy lock RECIPE`: write RECIPE's lock file (peftdeploy/lock.py) next to it."""
from __future__ import annotations

import click

from ..cli_common import emit_json, json_option, user_errors


@click.command("lock")
@click.argument("recipe", type=click.Path(dir_okay=False))
@click.option("--in-place", is_flag=True, help="Pin in the recipe itself instead (revision: <commit>, sha256: for "
              "every adapter, in the file that wrote each source; comments and layout kept).")
@click.option("--offline", is_flag=True, default=None, help="Never contact the hub (like HF_HUB_OFFLINE=1).")
@json_option
@user_errors
def lock_cmd(recipe: str, in_place: bool, offline: bool | None, as_json: bool) -> None:
    """Pin what RECIPE resolves to now (hub commits, adapter sha256s, peftdeploy and vLLM versions) in
    RECIPE's .lock.json; `peftdeploy up RECIPE --locked` refuses to run when anything drifted."""
    from ..lock import write_lock
    from ..recipe import load_recipe
    from ..sources import resolve

    loaded = load_recipe(recipe)
    resolved = resolve(loaded, fetch="metadata", offline=True if offline else None, progress=False)
    if in_place:
        from ..lock import pin_in_place

        pinned = pin_in_place(resolved)
        if as_json:
            emit_json({"ok": True, "recipe": str(loaded.path), "pinned": pinned})
            return
        click.echo(f"pinned in {loaded.path}:" if pinned else f"nothing to pin in {loaded.path}")
        for p in pinned:
            click.echo(f"  {p}")
        return
    path, data = write_lock(resolved)
    if as_json:
        emit_json({"ok": True, "lock": str(path), **data})
        return
    click.echo(f"wrote {path}")
    for what in ("backbone", "merge_base"):
        s = data[what]
        if s and s.get("commit"):
            click.echo(f"  {what}: {s['spec']} {s['revision']} -> {s['commit']}")
    for name, a in data["adapters"].items():
        pin = f" {a['revision']} -> {a['commit']}" if a.get("commit") else ""
        click.echo(f"  adapter {name}: {a['spec']}{pin}, sha256 {a.get('sha256')} ({a.get('sha256_from')})")
    click.echo(f"  peftdeploy {data['peftdeploy']}, vLLM {data['vllm'] or 'not installed'}")
