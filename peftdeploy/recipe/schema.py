"""The recipe format v1 as typed, strict pydantic models (the user-facing contract).

One small class per concern (as vLLM's config classes): constraints are types, cross-field rules
live in one validator per class, unknown keys are errors. Names here are the contract of
`shared/recipe-v1.md`; fields may be added, never renamed.
"""
from __future__ import annotations

import hashlib
import json
from typing import Annotated, Any, Literal, Union

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    SecretStr,
    StringConstraints,
    field_validator,
    model_validator,
)

API_VERSION = "peftdeploy/v1"
SUPPORTED_API_VERSIONS = (API_VERSION,)

RecipeName = Annotated[
    str, StringConstraints(pattern=r"^[a-z0-9]([a-z0-9-]*[a-z0-9])?$", max_length=63)
]
ADAPTER_NAME_PATTERN = r"^[a-z0-9][a-z0-9._-]*$"  # recipe-v1's adapter-name rule (the OpenAI `model` name)
ADAPTER_NAME_MAX = 128
AdapterName = Annotated[str, StringConstraints(pattern=ADAPTER_NAME_PATTERN, max_length=ADAPTER_NAME_MAX)]
Sha256 = Annotated[str, StringConstraints(pattern=r"^[0-9a-f]{64}$")]
Auto = Literal["auto"]
AutoOrPositiveInt = Union[Auto, Annotated[int, Field(ge=1)]]

Dtype = Literal["auto", "bfloat16", "float16", "float32"]
QuantScheme = Literal["none", "fp8", "int8", "w8a16", "w4a16", "bitsandbytes", "awq", "gptq"]
PREQUANTIZED_SCHEMES = ("awq", "gptq")
Mode = Literal["serve", "merge", "hybrid", "auto"]
# keep equal to peftdeploy.plan.kernels.CHOICES (a test checks; the recipe stage does not import plan/)
LoraKernels = Literal["auto", "peftdeploy", "vllm"]

SOURCE_SCHEMES = ("hf://", "s3://", "demo://", "file://")


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, validate_default=True)


class Secret(_Strict):
    """A secret taken from the environment. Only the variable's name is ever shown or written."""

    env: str | None = None  # the variable the value came from (None: no secret configured)
    value: SecretStr | None = Field(default=None, exclude=True, repr=False)

    @property
    def is_set(self) -> bool:
        return self.value is not None and self.value.get_secret_value() != ""

    def reference(self) -> str | None:
        return f"${{{self.env}}}" if self.env else None


class Backbone(_Strict):
    model: Annotated[str, StringConstraints(min_length=1)]
    revision: str | None = None
    dtype: Dtype = "auto"
    max_model_len: Annotated[int, Field(ge=16)] | None = None
    trust_remote_code: bool = False
    merge_base: str | None = None
    merge_base_revision: str | None = None


QuantMethod = Literal["auto", "rtn", "gptq", "awq", "runtime"]
# which methods each scheme takes ("auto" always); kept equal to peftdeploy.quantize.methods.METHODS
# (a test checks; the recipe stage does not import quantize/)
SCHEME_METHODS: dict[str, tuple[str, ...]] = {
    "none": (), "fp8": ("runtime", "rtn"), "int8": ("rtn", "gptq"), "w8a16": ("rtn", "gptq"),
    "w4a16": ("rtn", "gptq", "awq"), "bitsandbytes": ("runtime",), "awq": ("rtn", "gptq", "awq"),
    "gptq": ("rtn", "gptq", "awq"),
}


class Calibration(_Strict):
    """The text that calibrated methods (gptq, awq) see: peftdeploy's shipped set, or a team's own."""

    dataset: Annotated[str, StringConstraints(min_length=1)] = "builtin://mixed-prose"  # builtin://<name> | path to .txt / .jsonl
    sha256: Sha256 | None = None  # optional pin of the dataset file; mismatch = refuse
    samples: Annotated[int, Field(ge=1, le=4096)] = 64  # at most this many windows of seq_len tokens
    seq_len: Annotated[int, Field(ge=16, le=32768)] = 512


class Quantization(_Strict):
    scheme: QuantScheme = "none"
    kv_cache_dtype: Literal["auto", "fp8"] = "auto"
    # how the merged weights are quantized: auto = the best installed (gptq with the quantize tool venv,
    # else rtn; fp8: runtime); rtn = round-to-nearest, no data; gptq / awq = calibrated (llm-compressor);
    # runtime = vLLM quantizes while loading (fp8, bitsandbytes)
    method: QuantMethod = "auto"
    # w4a16: input channels per scale (auto = 128, or the largest of 64/32 dividing every layer);
    # smaller groups keep more accuracy for a few more scale bytes
    group_size: Union[Auto, Literal[32, 64, 128]] = "auto"
    calibration: Calibration = Calibration()
    # `up` refuses to serve a quantized merge whose perplexity on the eval text rose more than this
    # fraction over the full-precision merge (0.05 = 5%); None = not measured
    max_ppl_increase: Annotated[float, Field(gt=0, le=10, allow_inf_nan=False)] | None = None

    @property
    def prequantized(self) -> bool:
        return self.scheme in PREQUANTIZED_SCHEMES


class Adapter(_Strict):
    name: AdapterName
    source: Annotated[str, StringConstraints(min_length=1)]
    revision: str | None = None
    sha256: Sha256 | None = None
    # finite and within ±1000: 1e308 overflows the merged weights to inf (0 merges nothing)
    weight: Annotated[float, Field(allow_inf_nan=False, ge=-1000, le=1000)] = 1.0
    allow_pickle: bool = False  # opt in to adapter_model.bin (pickle); off by default

    @field_validator("weight")
    @classmethod
    def _nonzero_weight(cls, v: float) -> float:
        if v == 0:
            raise ValueError("weight 0 merges nothing: drop the adapter from policy.merge.adapters instead")
        return v


class MergePolicy(_Strict):
    adapters: list[AdapterName] | None = None  # None = all adapters
    output: str | None = None


class HybridPolicy(_Strict):
    """mode hybrid: merge the hot adapter into the backbone and serve every other adapter (and the bare
    backbone) as an exact LoRA delta against the merged weights."""

    hot: AdapterName | None = None  # None = the adapter with the largest policy.traffic share (else the first)


class Policy(_Strict):
    mode: Mode = "serve"
    merge: MergePolicy = MergePolicy()
    hybrid: HybridPolicy = HybridPolicy()
    dynamic_loading: bool = True
    # Extra places the vLLM plugin may resolve adapters from on first request, by name:
    # a local directory of adapter dirs, "hf://org/{name}" patterns, "s3://bucket/prefix/".
    catalog: list[str] = []
    # Expected share of requests per adapter name and for "base" (used by mode auto).
    traffic: dict[str, Annotated[float, Field(ge=0)]] | None = None


class Serving(_Strict):
    host: str = "127.0.0.1"
    port: Annotated[int, Field(ge=1, le=65535)] = 8000
    api_key: Secret = Secret()
    gpu_memory_utilization: Annotated[float, Field(gt=0, le=1)] = 0.90
    max_num_seqs: AutoOrPositiveInt = "auto"
    max_loras: AutoOrPositiveInt = "auto"
    max_lora_rank: AutoOrPositiveInt = "auto"
    max_cpu_loras: AutoOrPositiveInt = "auto"
    tensor_parallel_size: Annotated[int, Field(ge=1)] = 1
    # Which LoRA kernels vLLM runs for served adapters (the plugin reads PEFTDEPLOY_LORA_KERNELS, which
    # `plan` sets from this): peftdeploy's own (peftdeploy/vllm_plugin/lora_kernels/) or vLLM's punica ops.
    lora_kernels: LoraKernels = Field(
        "auto",
        description="LoRA kernels for served adapters: auto (peftdeploy's own where they are verified for the "
                    "target device, else vLLM's), peftdeploy, or vllm. `peftdeploy plan` shows the choice and why; "
                    "on a vLLM release the peftdeploy kernels were not verified against, the plugin keeps vLLM's "
                    "kernels and says so in the server log. Ignored when no adapter is served as LoRA (merge).")
    # With an api_key every route but GET /health needs it (peftdeploy.vllm_plugin.guard); true opens
    # /metrics as well, for a Prometheus scraper that has no key.
    public_metrics: bool = Field(
        False, description="Serve /metrics without the API key (for a Prometheus scraper); every other route "
                           "still needs serving.api_key when one is set.")
    extra_args: dict[str, Any] = {}

    @field_validator("extra_args")
    @classmethod
    def _extra_args_keys(cls, v: dict[str, Any]) -> dict[str, Any]:
        for k in v:
            if not isinstance(k, str) or not k or k.startswith("-"):
                raise ValueError(
                    f"extra_args keys are vLLM engine argument names without dashes, "
                    f"like 'enforce_eager' or 'max-num-batched-tokens'; got {k!r}"
                )
        return v


class Fleet(_Strict):
    """Several engines behind one OpenAI router (`peftdeploy/plan/fleet.py` plans the groups).

    A batch that holds any LoRA request pays the LoRA kernels for every request in it, so a hot adapter
    runs at merged speed only on replicas of its own: the planner gives an adapter whose traffic share
    justifies a replica a *merged* replica group (no LoRA at all) and serves the rest from shared multi-LoRA
    replicas; `up` starts one engine per group behind an OpenAI router, `render` writes one engine per group.
    """

    replicas: Annotated[int, Field(ge=1, le=256)] = Field(
        2, description="Engines in the fleet (all groups together); each engine uses "
                       "serving.tensor_parallel_size GPUs.")
    dedicated: Union[Auto, list[AdapterName]] = Field(
        "auto", description="Adapters that get a merged replica group of their own: auto (every adapter whose "
                            "share of policy.traffic, or of the observed traffic, fills at least one replica), or "
                            "a list of adapter names ([] = one shared multi-LoRA group).")
    max_replicas: Annotated[int, Field(ge=1, le=1024)] | None = Field(
        None, description="Autoscaling upper bound of every group, for targets that scale (ray-serve, kserve); "
                          "default: the planned replicas of the group (fixed size).")


class Recipe(_Strict):
    apiVersion: str
    name: RecipeName
    backbone: Backbone
    quantization: Quantization = Quantization()
    adapters: list[Adapter] = []
    policy: Policy = Policy()
    serving: Serving = Serving()
    fleet: Fleet | None = None  # None: one engine (no fleet)

    @field_validator("apiVersion")
    @classmethod
    def _api_version(cls, v: str) -> str:
        if v not in SUPPORTED_API_VERSIONS:
            raise ValueError(
                f"unsupported apiVersion {v!r}; supported: {', '.join(SUPPORTED_API_VERSIONS)}"
            )
        return v

    @model_validator(mode="after")
    def _cross_field(self) -> "Recipe":
        names = [a.name for a in self.adapters]
        seen: set[str] = set()
        for i, n in enumerate(names):
            if n in seen:
                raise _FieldError(("adapters", i, "name"), f"duplicate adapter name {n!r}; adapter names must be unique")
            seen.add(n)
        if self.policy.merge.adapters is not None:
            for i, n in enumerate(self.policy.merge.adapters):
                if n not in seen:
                    raise _FieldError(
                        ("policy", "merge", "adapters", i),
                        f"policy.merge.adapters names {n!r}, which is not an adapter of this recipe "
                        f"(adapters: {', '.join(names) or 'none'})",
                    )
        if self.policy.traffic:
            for k in self.policy.traffic:
                if k != "base" and k not in seen:
                    raise _FieldError(("policy", "traffic", k),
                                      f"traffic share for unknown adapter {k!r}; use adapter names or 'base'")
        hot = self.policy.hybrid.hot
        if hot is not None and hot not in seen:
            raise _FieldError(("policy", "hybrid", "hot"),
                              f"policy.hybrid.hot names {hot!r}, which is not an adapter of this recipe "
                              f"(adapters: {', '.join(names) or 'none'})")
        if self.policy.mode == "hybrid" and not self.adapters:
            raise _FieldError(("policy", "mode"), "mode hybrid needs at least one adapter (the hot one to merge)")
        if self.policy.mode == "hybrid" and self.quantization.prequantized and not self.backbone.merge_base:
            raise _FieldError(("policy", "mode"),
                              "mode hybrid merges the hot adapter, which needs full-precision weights: set "
                              "backbone.merge_base to the full-precision twin, or use policy.mode: serve")
        if self.policy.mode == "merge":
            if not self.adapters:
                raise _FieldError(("policy", "mode"), "mode merge needs at least one adapter to merge")
            if self.quantization.prequantized and not self.backbone.merge_base:
                raise _FieldError(
                    ("policy", "mode"),
                    f"mode merge with a pre-quantized backbone (scheme {self.quantization.scheme}) would merge "
                    f"into quantized weights, which loses the adapter's precision. Either set "
                    f"backbone.merge_base to the full-precision twin of the backbone (peftdeploy merges there, "
                    f"then quantizes), or use policy.mode: serve to keep the adapters unmerged",
                )
        q = self.quantization
        ok = SCHEME_METHODS[q.scheme]
        if q.method != "auto" and q.method not in ok:
            raise _FieldError(("quantization", "method"),
                              f"method {q.method!r} does not apply to scheme {q.scheme!r}; "
                              f"use {' | '.join(('auto',) + ok) if ok else 'auto (scheme none quantizes nothing)'}")
        if q.max_ppl_increase is not None and q.scheme == "none":
            raise _FieldError(("quantization", "max_ppl_increase"),
                              "max_ppl_increase gates a quantized model, and quantization.scheme is none: "
                              "set a scheme, or drop max_ppl_increase")
        if self.fleet is not None:
            self._check_fleet(names, seen)
        s = self.serving
        if isinstance(s.max_loras, int) and isinstance(s.max_cpu_loras, int) and s.max_cpu_loras < s.max_loras:
            raise _FieldError(("serving", "max_cpu_loras"),
                              f"max_cpu_loras ({s.max_cpu_loras}) must be >= max_loras ({s.max_loras})")
        return self

    def _check_fleet(self, names: list[str], seen: set[str]) -> None:
        f = self.fleet
        assert f is not None
        if self.policy.mode in ("merge", "hybrid"):
            raise _FieldError(("policy", "mode"),
                              f"a fleet decides merge or multi-LoRA per replica group; policy.mode "
                              f"{self.policy.mode} would decide it for every engine: use policy.mode: auto (or "
                              "serve), and fleet.dedicated to name the adapters that get merged replicas")
        if isinstance(f.dedicated, list):
            for i, n in enumerate(f.dedicated):
                if n not in seen:
                    raise _FieldError(("fleet", "dedicated", i),
                                      f"fleet.dedicated names {n!r}, which is not an adapter of this recipe "
                                      f"(adapters: {', '.join(names) or 'none'})")
                if n in f.dedicated[:i]:
                    raise _FieldError(("fleet", "dedicated", i), f"fleet.dedicated names {n!r} twice")
            rest = len(names) > len(f.dedicated) or bool(self.policy.catalog) or bool(
                (self.policy.traffic or {}).get("base"))
            need = len(f.dedicated) + (1 if rest else 0)
            if need > f.replicas:
                raise _FieldError(("fleet", "replicas"),
                                  f"fleet.replicas {f.replicas} is fewer than the groups it needs ({need}: "
                                  f"{len(f.dedicated)} dedicated merged group(s)"
                                  f"{' + 1 shared multi-LoRA group' if rest else ''})")
        if f.max_replicas is not None and f.max_replicas < f.replicas:
            raise _FieldError(("fleet", "max_replicas"),
                              f"fleet.max_replicas ({f.max_replicas}) must be >= fleet.replicas ({f.replicas})")
        if self.quantization.prequantized and not self.backbone.merge_base and f.dedicated not in ("auto", []):
            raise _FieldError(("fleet", "dedicated"),
                              "a dedicated group merges its adapter, which needs full-precision weights: set "
                              "backbone.merge_base to the full-precision twin, or fleet.dedicated: []")

    # -- helpers ---------------------------------------------------------------------------
    def adapter(self, name: str) -> Adapter:
        for a in self.adapters:
            if a.name == name:
                return a
        raise KeyError(name)

    def hot_adapter(self) -> str | None:
        """The hybrid policy's hot adapter: policy.hybrid.hot, else the largest traffic share, else the first."""
        if self.policy.hybrid.hot:
            return self.policy.hybrid.hot
        if not self.adapters:
            return None
        traffic = self.policy.traffic or {}
        return max(self.adapters, key=lambda a: float(traffic.get(a.name, 0.0))).name

    def merge_adapter_names(self) -> list[str]:
        if self.policy.merge.adapters is None:
            return [a.name for a in self.adapters]
        return list(self.policy.merge.adapters)

    def public_dict(self) -> dict[str, Any]:
        """The resolved recipe as plain data, secrets replaced by their ${VAR} reference."""
        d = self.model_dump(mode="json")
        d["serving"]["api_key"] = self.serving.api_key.reference()
        if d.get("fleet") is None:  # no fleet: the resolved recipe reads as before the section existed
            d.pop("fleet", None)
        return d

    def compute_hash(self) -> str:
        """A stable hash of the resolved recipe (secrets excluded).

        Fields left at their defaults are left out, so a later release that adds an optional
        field does not change the hash of an existing recipe.
        """
        d = self.model_dump(mode="json", exclude_defaults=True)
        if self.serving.api_key.env:
            d.setdefault("serving", {})["api_key"] = self.serving.api_key.reference()
        blob = json.dumps(d, sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(blob.encode()).hexdigest()


class _FieldError(ValueError):
    """Raised by cross-field validators to point at a precise field path."""

    def __init__(self, path: tuple[Any, ...], message: str):
        super().__init__(message)
        self.path = path
        self.message = message


# Fields that hold local-or-remote locations; relative local paths resolve against the file that
# wrote them (also through `extends`).
PATH_FIELDS: tuple[tuple[Any, ...], ...] = (
    ("backbone", "model"),
    ("backbone", "merge_base"),
    ("adapters", "*", "source"),
    ("policy", "merge", "output"),
    ("policy", "catalog", "*"),
    ("quantization", "calibration", "dataset"),
)
# Fields that hold secrets: they must be ${VAR} references, never literal values.
SECRET_FIELDS: tuple[tuple[Any, ...], ...] = (("serving", "api_key"),)


def json_schema() -> dict[str, Any]:
    """JSON Schema of the recipe file as users write it (for editors' YAML language servers)."""
    schema = Recipe.model_json_schema(mode="validation")
    schema["$schema"] = "https://json-schema.org/draft/2020-12/schema"
    schema["title"] = "peftdeploy recipe (apiVersion peftdeploy/v1)"
    props = schema["properties"]
    props["apiVersion"] = {"const": API_VERSION, "type": "string", "description": "Recipe format version"}
    props["extends"] = {"type": "string", "description": "Path of a parent recipe, relative to this file"}
    # In the file, api_key is a "${VAR}" string (the Secret object exists only after loading).
    serving = schema["$defs"]["Serving"]["properties"]
    serving["api_key"] = {
        "anyOf": [{"type": "string", "pattern": r"^\$\{[A-Za-z_][A-Za-z0-9_]*(:-[^}]*)?\}$"}, {"type": "null"}],
        "description": "API key clients must send, as a ${VAR} reference to an environment variable",
        "default": None,
    }
    schema["$defs"].pop("Secret", None)
    # A recipe that `extends` a parent may leave any required key (also nested ones, like
    # backbone.model) to the parent: such files validate against a "Partial" twin of every class
    # with the same properties and no required keys.
    defs = schema.pop("$defs")
    top = {k: schema.pop(k) for k in ("$schema", "title")}
    defs["Recipe"] = schema
    for name in list(defs):
        defs["Partial" + name] = _partial(defs[name])
    return {**top, "$defs": defs, "if": {"required": ["extends"]},
            "then": {"$ref": "#/$defs/PartialRecipe"}, "else": {"$ref": "#/$defs/Recipe"}}


def _partial(node: Any) -> Any:
    """A copy of a JSON-schema node with `required` dropped and $refs pointed at Partial* twins."""
    if isinstance(node, dict):
        out = {}
        for k, v in node.items():
            if k == "required":
                continue
            if k == "$ref" and isinstance(v, str) and v.startswith("#/$defs/"):
                v = "#/$defs/Partial" + v[len("#/$defs/"):]
            out[k] = _partial(v)
        return out
    if isinstance(node, list):
        return [_partial(x) for x in node]
    return node
