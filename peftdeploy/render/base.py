"""What every render target shares: the RenderContext, source mapping, vLLM args, YAML output.

Renderers never read files or the network: everything comes from the RenderContext (the recipe's
public dict — secrets already replaced by their ${VAR} reference — and the planned LaunchSpec).

In a cluster the machine's local paths don't exist, so sources are used *as written in the recipe*:

* ``hf://org/repo`` backbone: vLLM downloads it itself (``--revision`` pins the revision); an
  ``hf://org/repo/subdir`` backbone and every ``hf://`` adapter are fetched by an init step with
  ``huggingface_hub.snapshot_download`` (so adapter revisions and subdirectories are honoured).
* ``s3://bucket/prefix``: fetched by an init step with the aws CLI.
* local paths, ``file://`` and ``demo://``: refused (exit 2) with the adapter/backbone named — they
  exist on this machine only; publish them to hf:// or s3:// first. (demo:// is the embedded CPU toy
  model: clusters run GPUs, and a demo recipe is meant for `peftdeploy up` on a laptop.)
"""
from __future__ import annotations

import json
import re
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Iterator, Mapping

import yaml

from ..errors import PeftDeployError
from ..plan.spec import GUARD_MIDDLEWARE, MODEL_NAMES_ENV, TRAFFIC_MIDDLEWARE, LaunchSpec

if TYPE_CHECKING:  # pragma: no cover
    from ..recipe.schema import Recipe

# Pinned images (change deliberately: the golden files show every use).
DEFAULT_VLLM_IMAGE = "vllm/vllm-openai:v0.33.0"  # the vLLM release current on PyPI when pinned
DEFAULT_TOOLS_IMAGE = "peftdeploy/peftdeploy:0.1.0"  # runs `peftdeploy merge` (merge policy)
# The stock vLLM image + peftdeploy (docker/vllm-peftdeploy.Dockerfile): the vLLM plugin (catalog adapters
# resolved on first request, LoRA kernels), the traffic counter and the API-key guard travel with it.
# `render --image auto` (the default) uses it for recipes that need the plugin (policy.catalog), else the stock one.
PLUGIN_VLLM_IMAGE = "peftdeploy/vllm-openai:v0.33.0-peftdeploy0.1.0"
AUTO_IMAGE = "auto"
AWS_CLI_IMAGE = "amazon/aws-cli:2.17.0"

CONTAINER_PORT = 8000
MODELS_DIR = "/models"
ADAPTERS_DIR = "/adapters"
RECIPE_DIR = "/etc/peftdeploy"
MERGED_DIR = f"{MODELS_DIR}/merged"

LABEL_NAME = "app.kubernetes.io/name"
LABEL_RECIPE = "peftdeploy.io/recipe"
LABEL_HASH = "peftdeploy.io/recipe-hash"

# Flags a renderer sets itself (host/port/model/adapters are cluster-specific; secrets are env).
_OWN_FLAGS = {"--host", "--port", "--lora-modules", "--api-key", "--download-dir", "--served-model-name",
              "--revision", "--model"}
# Flags (flag, value) the local `up` adds for a serving host that has peftdeploy installed: the traffic
# counter middleware (peftdeploy.vllm_plugin.traffic). The cluster image (vllm/vllm-openai) does not
# have peftdeploy, so vLLM would fail to import it there.
_LOCAL_FLAGS = {("--middleware", TRAFFIC_MIDDLEWARE), ("--middleware", GUARD_MIDDLEWARE)}
# Environment the local `up` sets for this machine only (plugin recipe path, traffic counter, local caches).
_LOCAL_ENV = {"PEFTDEPLOY_RECIPE", MODEL_NAMES_ENV, "PEFTDEPLOY_MAX_N", "PEFTDEPLOY_CACHE", "VLLM_PLUGINS", "HF_HOME",
              "HF_HUB_CACHE", "HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "XDG_CACHE_HOME"}


# Server images known to have no peftdeploy (so no peftdeploy vLLM plugin and no peftdeploy LoRA kernels).
STOCK_VLLM_IMAGES = ("vllm/vllm-openai", "docker.io/vllm/vllm-openai")


def server_kernels(image: str) -> dict[str, Any]:
    """make_plan keyword arguments saying which LoRA kernels a server running `image` can use: a stock vLLM
    image has no peftdeploy plugin (serving.lora_kernels: auto then plans vLLM's kernels and mode auto
    predicts with their measured ratios); another image is taken to have the plugin, on the vLLM release
    its tag names (``...:v0.26.0``; unknown otherwise, and the plugin checks at start)."""
    from ..plan.kernels import image_vllm_version

    base = image.split("@", 1)[0]
    name = base.rsplit(":", 1)[0] if ":" in base.rsplit("/", 1)[-1] else base
    stock = name in STOCK_VLLM_IMAGES
    return {"vllm_version": image_vllm_version(image), "lora_plugin": not stock, "server_image": image}


def resolve_image(image: str | None, recipe: Recipe) -> str:
    """`--image auto`: the peftdeploy-enabled image when the recipe needs the plugin in the server (catalog
    adapters resolved on first request), else the stock vLLM image."""
    if image and image != AUTO_IMAGE:
        return image
    p = recipe.policy
    return PLUGIN_VLLM_IMAGE if (p.catalog and p.dynamic_loading) else DEFAULT_VLLM_IMAGE


def cache_size(download_bytes: int | None) -> str | None:
    """The HF cache volume for what a pod downloads: 1.25× the bytes, whole GiB, at least 10Gi."""
    if not download_bytes:
        return None
    gi = -(-int(download_bytes * 1.25) // (1 << 30))
    return f"{max(10, gi)}Gi"


class RenderError(PeftDeployError):
    """The recipe cannot be rendered for this target as it is (exit 2, with the way forward)."""


@dataclass(frozen=True)
class Source:
    """A backbone or adapter source, as a cluster sees it."""

    subject: str  # "backbone" or "adapter <name>"
    spec: str  # as written in the recipe
    kind: str  # "hf" | "s3" | "gs"
    repo_id: str | None = None  # hf
    subdir: str | None = None  # hf
    revision: str | None = None


def parse_source(spec: str, subject: str, revision: str | None = None) -> Source:
    if spec.startswith("hf://"):
        m = re.match(r"^hf://([^/\s]+)/([^/\s]+)(?:/(.+?))?/?$", spec)
        if not m:
            raise RenderError(f"{subject}: bad hub source {spec!r}", fix="write hf://org/repo or hf://org/repo/subdir")
        return Source(subject, spec, "hf", f"{m.group(1)}/{m.group(2)}", m.group(3), revision)
    if spec.startswith(("s3://", "gs://")):
        return Source(subject, spec.rstrip("/"), spec[:2], revision=revision)
    where = "demo:// (the embedded CPU demo model)" if spec.startswith("demo://") else "a path on this machine"
    raise RenderError(
        f"{subject} source {spec!r} is {where}, which does not exist inside a cluster",
        fix=f"publish the {subject.split(' ')[0]} to hf://org/repo or s3://bucket/prefix and use that "
            f"in the recipe (or deploy this recipe locally with `peftdeploy up`)",
    )


@dataclass(frozen=True)
class RenderContext:
    """Everything a target renderer needs. Frozen; the recipe is a read-only mapping."""

    recipe: Mapping[str, Any]  # Recipe.public_dict(): secrets as ${VAR}
    recipe_name: str
    recipe_hash: str
    launch: LaunchSpec
    replicas: int = 1
    namespace: str = "default"
    image: str = DEFAULT_VLLM_IMAGE
    tools_image: str = DEFAULT_TOOLS_IMAGE
    gpu_type: str = "nvidia.com/gpu"  # Kubernetes extended resource name
    accelerator: str | None = None  # SkyPilot / Ray accelerator type, e.g. "H100" (None: any GPU)
    storage_size: str = "200Gi"  # PVC for the merged model (merge policy)
    store: str | None = None  # ray-serve: s3:// or gs:// prefix it loads adapters / merged models from
    group: str | None = None  # a fleet's replica group this context renders (None: no fleet)
    max_replicas: int | None = None  # autoscaling upper bound (fleet.max_replicas) for targets that scale

    @property
    def plugin(self) -> bool:
        """The server image has peftdeploy (its vLLM plugin, traffic counter and guard middleware)."""
        return bool(server_kernels(self.image)["lora_plugin"])

    @property
    def cache_size(self) -> str | None:
        """Size of the HF cache PVC (from the plan's download bytes); None: unknown (an emptyDir)."""
        return cache_size(self.launch.extra.get("download_bytes"))

    def skipped_features(self) -> list[dict[str, str]]:
        """What the local `up` runs that this render's server cannot carry (warnings, never silent)."""
        if self.plugin:
            return []
        img = f"the image {self.image} has no peftdeploy"
        out = [{"feature": "traffic counter", "why": f"{img}: no peftdeploy_requests_total on /metrics (plan "
                "--observed has nothing to read)", "fix": f"--image {PLUGIN_VLLM_IMAGE} (or auto)"},
               {"feature": "api-key guard", "why": f"{img}: vLLM checks the API key only on /v1/* and leaves its "
                "runtime adapter load/unload routes open", "fix": f"--image {PLUGIN_VLLM_IMAGE}"}]
        p = self.recipe.get("policy", {})
        if p.get("catalog") and p.get("dynamic_loading", True):
            out.append({"feature": "policy.catalog", "why": f"{img} vLLM plugin: catalog adapters are not resolved "
                        "on first request (they would 404)", "fix": f"--image {PLUGIN_VLLM_IMAGE} (or auto)"})
        return out

    @property
    def gpu_count(self) -> int:
        return max(1, int(self.launch.tensor_parallel_size))

    @property
    def name(self) -> str:
        """Kubernetes-safe object name (recipe names are already DNS labels)."""
        return self.recipe_name

    @property
    def secret_name(self) -> str:
        return f"{self.recipe_name}-secrets"

    @property
    def merge(self) -> bool:
        return self.launch.mode == "merge" and self.launch.merge is not None

    # -- sources ---------------------------------------------------------------------------
    @property
    def backbone(self) -> Source:
        bb = self.recipe["backbone"]
        spec = bb["model"] or self.launch.model_source
        return parse_source(spec, "backbone", bb.get("revision"))

    def adapter_sources(self) -> list[tuple[str, Source]]:
        """(name, source) for every adapter vLLM serves (none under merge policy)."""
        if self.merge:
            return []
        by_name = {a["name"]: a for a in self.recipe.get("adapters", [])}
        out = []
        for a in self.launch.adapters:
            ra = by_name.get(a.name, {})
            out.append((a.name, parse_source(ra.get("source", a.source), f"adapter {a.name!r}", ra.get("revision"))))
        return out

    def check_sources(self) -> None:
        """Raise RenderError for the first source a cluster cannot reach (merge: all of them)."""
        self.backbone
        if self.merge:
            for a in self.recipe.get("adapters", []):
                if a["name"] in self.launch.merge.adapters:
                    parse_source(a["source"], f"adapter {a['name']!r}")
            mb = self.recipe["backbone"].get("merge_base")
            if mb:
                parse_source(mb, "backbone merge_base")
        else:
            self.adapter_sources()

    # -- metadata --------------------------------------------------------------------------
    def labels(self, component: str | None = None) -> dict[str, str]:
        d = {
            LABEL_NAME: self.name,
            "app.kubernetes.io/instance": self.name,
            "app.kubernetes.io/managed-by": "peftdeploy",
            LABEL_RECIPE: self.recipe_name,
            # label values are at most 63 characters: the full hash is in the annotation
            LABEL_HASH: self.recipe_hash[:16],
        }
        if component:
            d["app.kubernetes.io/component"] = component
        return dict(sorted(d.items()))

    def selector(self) -> dict[str, str]:
        return {LABEL_NAME: self.name, "app.kubernetes.io/instance": self.name}

    def annotations(self) -> dict[str, str]:
        return dict(sorted({LABEL_HASH: self.recipe_hash, LABEL_RECIPE: self.recipe_name}.items()))

    # -- secrets ---------------------------------------------------------------------------
    def secret_env(self) -> list[tuple[str, str]]:
        """(server env var, source env var) for the API key and friends, sorted; never values."""
        pairs = dict(self.launch.secret_env)
        ref = self.recipe.get("serving", {}).get("api_key")
        m = re.match(r"^\$\{([A-Za-z_][A-Za-z0-9_]*)", ref or "")
        if m and "VLLM_API_KEY" not in pairs:
            pairs["VLLM_API_KEY"] = m.group(1)
        pairs.pop("HF_TOKEN", None)  # rendered separately (optional)
        return sorted(pairs.items())

    def api_key_env(self) -> str | None:
        return dict(self.secret_env()).get("VLLM_API_KEY")

    # -- environment -----------------------------------------------------------------------
    def plain_env(self) -> list[tuple[str, str]]:
        """Non-secret server environment, without this machine's local settings, sorted."""
        local_paths = self._local_paths()
        out = {}
        keep = {MODEL_NAMES_ENV, "PEFTDEPLOY_MAX_N"} if self.plugin else set()
        for k, v in self.launch.env:
            if k == "PEFTDEPLOY_RECIPE" and self.plugin and self.uses_recipe:
                out[k] = f"{RECIPE_DIR}/recipe.yaml"  # the ConfigMap, mounted there
                continue
            if (k in _LOCAL_ENV and k not in keep) or k in dict(self.launch.secret_env) or v in local_paths:
                continue
            out[k] = v
        return sorted(out.items())

    @property
    def uses_recipe(self) -> bool:
        """The server reads the recipe (PEFTDEPLOY_RECIPE): the plugin's catalog or the traffic counter."""
        return self.plugin

    def _local_paths(self) -> set[str]:
        p = {self.launch.model}
        p.update(a.path for a in self.launch.adapters)
        if self.launch.merge is not None:
            p.add(self.launch.merge.output_dir)
            p.add(self.launch.merge.served_dir)
        if self.launch.plugin_recipe:
            p.add(self.launch.plugin_recipe)
        return {x for x in p if x}

    # -- the recipe as it runs in the cluster ------------------------------------------------
    def cluster_recipe(self, merged_dir: str = MERGED_DIR) -> dict[str, Any]:
        """The resolved recipe for the ConfigMap: merge output pointed at the models volume."""
        d = json.loads(json.dumps(dict(self.recipe)))  # deep copy of plain data
        if self.merge:
            d.setdefault("policy", {}).setdefault("merge", {})["output"] = merged_dir
        return d


def vllm_flags(ctx: RenderContext, *, adapter_paths: Mapping[str, str] | None = None,
               include_served_name: bool = True, include_revision: bool = True) -> list[str]:
    """The planned vLLM flags for the cluster: local paths replaced, adapters as --lora-modules."""
    local = ctx._local_paths()
    out: list[str] = []
    if include_served_name:
        out += ["--served-model-name", ctx.launch.served_model_name]
    bb = ctx.backbone
    if include_revision and not ctx.merge and bb.kind == "hf" and not bb.subdir and bb.revision:
        out += ["--revision", bb.revision]
    skipping = False
    for k, v in ctx.launch.args:
        if not k.startswith("-"):  # continuation token of the previous flag, e.g. 2nd..nth --lora-modules
            if skipping:
                continue
            out.append(k)
            continue
        skipping = k in _OWN_FLAGS or ((k, v) in _LOCAL_FLAGS and not ctx.plugin)
        if skipping:
            continue
        if v is not None and v in local:
            raise RenderError(f"the planned vLLM flag {k} points at a local path ({v}), which a cluster does not have",
                              fix="report this: the renderer should map it")
        out.append(k)
        if v is not None:
            out.append(v)
    if adapter_paths:
        if "--enable-lora" not in out:
            out.append("--enable-lora")
        out.append("--lora-modules")
        out += [f"{n}={p}" for n, p in adapter_paths.items()]
    out += ["--host", "0.0.0.0", "--port", str(CONTAINER_PORT)]
    return out


def flag_pairs(flags: list[str], skip: tuple[str, ...] = ("--host", "--port")) -> Iterator[tuple[str, str | None]]:
    """(flag, value or None) over a `vllm_flags` list, leaving out `skip` (what a target sets itself).
    A value is the next token unless it is itself a flag (a bare boolean flag has none)."""
    i = 0
    while i < len(flags):
        f = flags[i]
        has_val = i + 1 < len(flags) and not flags[i + 1].startswith("--")
        val = flags[i + 1] if has_val else None
        i += 2 if has_val else 1
        if f not in skip:
            yield f, val


def served_merged_dir(ctx: RenderContext, merged_dir: str = MERGED_DIR) -> str:
    """The directory vLLM serves under merge policy: the merge output, or for schemes peftdeploy
    quantizes offline the quantized checkpoint next to it (`peftdeploy merge` writes both)."""
    q = ctx.launch.merge.quantize_scheme if ctx.launch.merge is not None else None
    return f"{merged_dir}-{q}" if q else merged_dir


def model_location(ctx: RenderContext) -> str:
    """What vLLM serves in a pod: the merged model, a fetched directory, or a hub repo id."""
    if ctx.merge:
        return served_merged_dir(ctx)
    bb = ctx.backbone
    if bb.kind == "hf" and not bb.subdir:
        return bb.repo_id  # type: ignore[return-value]
    return f"{MODELS_DIR}/backbone"


def fetch_script(ctx: RenderContext) -> tuple[str | None, str | None]:
    """(python script for hf:// fetches, shell script for s3/gs fetches) into the pod's volumes."""
    hf: list[dict[str, Any]] = []
    sh: list[str] = []
    items: list[tuple[Source, str]] = []
    if not ctx.merge:
        bb = ctx.backbone
        if not (bb.kind == "hf" and not bb.subdir):
            items.append((bb, f"{MODELS_DIR}/backbone"))
        for name, src in ctx.adapter_sources():
            items.append((src, f"{ADAPTERS_DIR}/{name}"))
    for src, dest in items:
        if src.kind == "hf":
            hf.append({"repo_id": src.repo_id, "revision": src.revision, "subdir": src.subdir, "dest": dest})
        elif src.kind == "s3":
            sh.append(f"aws s3 sync {src.spec}/ {dest}/")
        else:  # gs
            sh.append(f"gcloud storage rsync --recursive {src.spec}/ {dest}/")
    py = None
    if hf:
        py = (
            "import json, os, shutil\n"
            "from huggingface_hub import snapshot_download\n"
            f"for f in json.loads({json.dumps(json.dumps(hf, sort_keys=True))}):\n"
            "    allow = [f['subdir'] + '/*'] if f['subdir'] else None\n"
            "    tmp = f['dest'] + '.tmp'\n"
            "    snapshot_download(repo_id=f['repo_id'], revision=f['revision'], local_dir=tmp, allow_patterns=allow)\n"
            "    src = os.path.join(tmp, f['subdir']) if f['subdir'] else tmp\n"
            "    shutil.rmtree(f['dest'], ignore_errors=True)\n"
            "    os.rename(src, f['dest'])\n"
            "    print('fetched', f['repo_id'], '->', f['dest'], flush=True)\n"
        )
    shell = ("set -eu\n" + "\n".join(sh) + "\n") if sh else None
    return py, shell


# -- YAML ---------------------------------------------------------------------------------------
class _Dumper(yaml.SafeDumper):
    def ignore_aliases(self, data: Any) -> bool:  # no &id001 anchors: every document reads alone
        return True


def _str_representer(dumper: yaml.SafeDumper, data: str) -> yaml.Node:
    style = "|" if "\n" in data else None
    return dumper.represent_scalar("tag:yaml.org,2002:str", data, style=style)


_Dumper.add_representer(str, _str_representer)


def dump_yaml(obj: Any) -> str:
    """Stable YAML: keys in the order the renderer built them (sorted where order is meaningless)."""
    return yaml.dump(obj, Dumper=_Dumper, sort_keys=False, default_flow_style=False, allow_unicode=True, width=1000)


def dump_yaml_docs(docs: list[Any]) -> str:
    return "---\n".join(dump_yaml(d) for d in docs)


def header(ctx: RenderContext, target: str, extra: str = "") -> str:
    lines = [f"# Rendered by peftdeploy for target {target} — do not edit; re-render from the recipe.",
             f"# recipe: {ctx.recipe_name}  hash: {ctx.recipe_hash}"]
    lines += [f"# {x}" if x else "#" for x in extra.splitlines()]
    return "\n".join(lines) + "\n"
