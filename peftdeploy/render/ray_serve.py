"""Target `ray-serve`: a Ray Serve LLM application config (serve run / serve deploy).

    serve run serve-config.yaml        # or: serve deploy serve-config.yaml

One `LLMConfig` (ray.serve.llm) behind `build_openai_app`: engine_kwargs are the planned vLLM flags
(`--max-loras 4` -> `max_loras: 4`), replicas are fixed autoscaling bounds. Ray Serve loads LoRA
adapters only from one cloud prefix (`lora_config.dynamic_lora_loading_path`, one directory per
adapter name) and clients ask for them as `<model id>:<adapter>`:

* s3:// adapters that already sit under one prefix as `<prefix>/<adapter name>` are used in place;
* otherwise `--store s3://bucket/prefix` names where they go, and `sync-to-store.sh` copies them
  there (hub adapters at their recipe revision), and for merge policy merges and uploads the
  merged model, which `model_source` then points at.

Secrets: Ray Serve's OpenAI ingress has no API key of its own (put it behind your gateway); HF_TOKEN
must be set in the Ray cluster's environment. No value is ever written here.
"""
from __future__ import annotations

import posixpath
import shlex
from typing import Any

from .base import RenderContext, RenderError, dump_yaml, flag_pairs, header, served_merged_dir, vllm_flags

TARGET = "ray-serve"
_REMOTE = ("s3://", "gs://", "abfss://", "azure://")


def _value(v: str | None) -> Any:
    if v is None:
        return True
    for typ in (int, float):
        try:
            return typ(v)
        except ValueError:
            pass
    if v.lower() in ("true", "false"):
        return v.lower() == "true"
    return v


def engine_kwargs(ctx: RenderContext) -> dict[str, Any]:
    flags = vllm_flags(ctx, include_served_name=False)
    out: dict[str, Any] = {}
    for f, val in flag_pairs(flags):
        key = f[2:].replace("-", "_")
        if key.startswith("no_") and val is None:
            out[key[3:]] = False
        else:
            out[key] = _value(val)
    if ctx.launch.adapters and not ctx.merge:
        out["enable_lora"] = True
    out["tensor_parallel_size"] = ctx.gpu_count
    return dict(sorted(out.items()))


def _store(ctx: RenderContext) -> str | None:
    return ctx.store.rstrip("/") if ctx.store else None


def adapter_prefix(ctx: RenderContext) -> tuple[str | None, bool]:
    """(dynamic_lora_loading_path, whether adapters must be copied there)."""
    adapters = ctx.adapter_sources()
    if not adapters:
        return None, False
    parents = {posixpath.dirname(s.spec) for _, s in adapters if s.kind in ("s3", "gs")}
    in_place = all(s.kind in ("s3", "gs") and posixpath.basename(s.spec) == n for n, s in adapters)
    if in_place and len(parents) == 1 and not ctx.store:
        return parents.pop(), False
    store = _store(ctx)
    if not store:
        names = ", ".join(n for n, _ in adapters)
        raise RenderError(
            f"ray-serve loads LoRA adapters from one cloud storage prefix (<prefix>/<adapter name>); "
            f"the adapters of {ctx.recipe_name} ({names}) are not laid out that way",
            fix="pass --store s3://bucket/prefix: the rendered sync-to-store.sh copies them there")
    return f"{store}/adapters", True


def merged_uri(ctx: RenderContext) -> str:
    store = _store(ctx)
    if not store:
        raise RenderError(
            f"ray-serve serves {ctx.recipe_name}'s merged model from cloud storage, which needs a place to put it",
            fix="pass --store s3://bucket/prefix: the rendered sync-to-store.sh merges and uploads it")
    key = ctx.launch.merge.cache_key[:16] if ctx.launch.merge else ctx.recipe_hash[:16]
    return f"{store}/models/{ctx.recipe_name}-{key}"


def llm_config(ctx: RenderContext) -> dict[str, Any]:
    bb = ctx.backbone
    if ctx.merge:
        source: Any = {"bucket_uri": merged_uri(ctx)}
    elif bb.kind == "hf" and not bb.subdir:
        source = bb.repo_id
    elif bb.kind in ("s3", "gs"):
        source = {"bucket_uri": bb.spec}
    else:
        raise RenderError(f"ray-serve cannot load the backbone {bb.spec} (a hub subdirectory)",
                          fix="publish the model at the root of an hf:// repo or an s3:// prefix")
    cfg: dict[str, Any] = {
        "model_loading_config": {"model_id": ctx.launch.served_model_name, "model_source": source},
    }
    if ctx.accelerator:
        cfg["accelerator_type"] = ctx.accelerator
    cfg["deployment_config"] = {"autoscaling_config": {"min_replicas": ctx.replicas,
                                                       "max_replicas": max(ctx.replicas, ctx.max_replicas or 0)}}
    cfg["engine_kwargs"] = engine_kwargs(ctx)
    prefix, _ = adapter_prefix(ctx)
    if prefix:
        cfg["lora_config"] = {
            "dynamic_lora_loading_path": prefix,
            "max_num_adapters_per_replica": max(len(ctx.launch.adapters),
                                                int(cfg["engine_kwargs"].get("max_loras", 1))),
        }
    env = dict(ctx.plain_env())
    if env:
        cfg["runtime_env"] = {"env_vars": env}
    return cfg


def serve_config(ctx: RenderContext) -> dict[str, Any]:
    return {
        "applications": [{
            "name": ctx.name,
            "route_prefix": "/",
            "import_path": "ray.serve.llm:build_openai_app",
            "args": {"llm_configs": [llm_config(ctx)]},
        }],
    }


def sync_script(ctx: RenderContext) -> str | None:
    lines: list[str] = []
    _, copy = adapter_prefix(ctx)
    if copy:
        dest = f"{_store(ctx)}/adapters"
        for name, src in ctx.adapter_sources():
            if src.kind == "hf":
                rev = f" --revision {shlex.quote(src.revision)}" if src.revision else ""
                inc = f" --include {shlex.quote(src.subdir + '/*')}" if src.subdir else ""
                local = f"$work/{name}" + (f"/{src.subdir}" if src.subdir else "")
                lines.append(f"hf download {shlex.quote(src.repo_id or '')}{rev}{inc} --local-dir \"$work/{name}\"")
                lines.append(f"aws s3 sync \"{local}\" {shlex.quote(dest + '/' + name)}")
            else:
                lines.append(f"aws s3 sync {shlex.quote(src.spec)} {shlex.quote(dest + '/' + name)}")
    if ctx.merge:
        lines.append("# merge in full precision (needs: pip install 'peftdeploy[merge]'; recipe.yaml is beside this file)")
        lines.append("peftdeploy merge \"$here/recipe.yaml\"")
        lines.append(f"aws s3 sync \"$here/{served_merged_dir(ctx, 'merged')}\" {shlex.quote(merged_uri(ctx))}")
    if not lines:
        return None
    return (
        "#!/bin/sh\n"
        f"# Rendered by peftdeploy for target {TARGET}; recipe: {ctx.recipe_name}  hash: {ctx.recipe_hash}\n"
        f"# Copy what {ctx.recipe_name}'s Ray Serve config loads into {_store(ctx)} (run once per recipe change).\n"
        "# Credentials come from your environment (HF_TOKEN, AWS_*); none are written here.\n"
        "set -eu\n"
        "here=$(cd \"$(dirname \"$0\")\" && pwd)\n"
        "work=$(mktemp -d)\n"
        "trap 'rm -rf \"$work\"' EXIT\n"
        + "\n".join(lines) + "\n"
    )


def render(ctx: RenderContext) -> dict[str, str]:
    ctx.check_sources()
    models = [ctx.launch.served_model_name] + [f"{ctx.launch.served_model_name}:{a.name}" for a in ctx.launch.adapters
                                              if not ctx.merge]
    h = header(ctx, TARGET, "serve run serve-config.yaml   (or: serve deploy serve-config.yaml)\n"
                            f"OpenAI `model` names: {', '.join(models)}")
    files = {"serve-config.yaml": h + dump_yaml(serve_config(ctx))}
    script = sync_script(ctx)
    if script:
        files["sync-to-store.sh"] = script
    if ctx.merge:
        r = ctx.cluster_recipe()
        r["policy"]["merge"]["output"] = "./merged"
        files["recipe.yaml"] = h + dump_yaml(r)
    return dict(sorted(files.items()))


def render_fleet(ctxs: list[RenderContext], fleet: Any) -> dict[str, str]:
    """One application, one LLMConfig per replica group behind build_openai_app's router (model id ->
    deployment): the merged groups' model ids are their adapters' names, the multi-LoRA group's the base
    model's (its adapters as `<model id>:<adapter>`); autoscaling bounds per group."""
    for c in ctxs:
        c.check_sources()
    c0 = ctxs[0]
    models = []
    for c in ctxs:
        models.append(c.launch.served_model_name)
        if not c.merge:
            models += [f"{c.launch.served_model_name}:{a.name}" for a in c.launch.adapters]
    h = header(c0, TARGET, "serve run serve-config.yaml   (or: serve deploy serve-config.yaml)\n"
                           f"fleet: {fleet.reason}\nOpenAI `model` names: {', '.join(models)}")
    cfg = {"applications": [{"name": fleet.recipe or c0.recipe_name, "route_prefix": "/", "import_path": "ray.serve.llm:build_openai_app",
                             "args": {"llm_configs": [llm_config(c) for c in ctxs]}}]}
    files = {"serve-config.yaml": h + dump_yaml(cfg)}
    scripts = []
    for c in ctxs:
        x = sync_script(c)
        if x and c.merge:  # each merged group merges its own recipe file into its own directory
            x = x.replace('"$here/recipe.yaml"', f'"$here/recipe-{c.group}.yaml"').replace(
                '"$here/merged', f'"$here/merged-{c.group}')
        if x:
            scripts.append(x)
    if scripts:
        files["sync-to-store.sh"] = scripts[0] + "".join(
            "\n".join(ln for ln in x.splitlines()[8:]) + "\n" for x in scripts[1:])
    for c in ctxs:
        if c.merge:
            r = c.cluster_recipe()
            r["policy"]["merge"]["output"] = f"./merged-{c.group}"
            files[f"recipe-{c.group}.yaml"] = h + dump_yaml(r)
    return dict(sorted(files.items()))
