"""LaunchSpec: exactly what runs — the hand-off from `plan` to `up` (local) and `render` (clusters).

Pure data, no torch / vLLM. Secrets are *references* (the name of an environment variable), never
values: `up` reads them from its own environment when it starts the server, `render` turns them
into Secret references.
"""
from __future__ import annotations

import shlex
from dataclasses import asdict, dataclass, field
from typing import Any

# Requests per served model name, counted inside vLLM's API server (peftdeploy.vllm_plugin.traffic):
# `up` adds ("--middleware", TRAFFIC_MIDDLEWARE) and MODEL_NAMES_ENV (the served names, base first,
# comma-joined); renderers drop both, since cluster images (vllm/vllm-openai) have no peftdeploy.
TRAFFIC_MIDDLEWARE = "peftdeploy.vllm_plugin.traffic.TrafficMiddleware"
# The API key on every route, vLLM's runtime adapter routes closed (peftdeploy.vllm_plugin.guard): `up` adds
# ("--middleware", GUARD_MIDDLEWARE) last, so it runs first; renderers drop it with the traffic counter.
GUARD_MIDDLEWARE = "peftdeploy.vllm_plugin.guard.GuardMiddleware"
MODEL_NAMES_ENV = "PEFTDEPLOY_MODEL_NAMES"
# Which LoRA kernels peftdeploy's vLLM plugin selects in every vLLM process (peftdeploy | vllm): set by plan
# from serving.lora_kernels whenever adapters are served as LoRA; `up` and every renderer pass it on
# (= peftdeploy.plan.kernels.ENV).
LORA_KERNELS_ENV = "PEFTDEPLOY_LORA_KERNELS"


@dataclass(frozen=True)
class ServedAdapter:
    name: str  # the OpenAI `model` name
    path: str  # local directory vLLM loads (after resolve)
    source: str  # as written in the recipe (hf://, s3://, demo://, local path)
    rank: int
    preload: bool = True  # passed with --lora-modules at start; else resolved on first request


@dataclass(frozen=True)
class MergeStep:
    """For merge (and hybrid) policy: what must be merged (and quantized) before the server starts.

    `up` materializes exactly these paths (peftdeploy/launch/materialize.py): the full-precision merge
    into `output_dir`; for an offline quantization scheme the quantized checkpoint into
    `quantized_dir` (then that is what vLLM serves: LaunchSpec.model == quantized_dir); in hybrid
    mode the delta adapters into `delta_dir/<served name>`.
    """

    adapters: tuple[str, ...]
    output_dir: str  # where the full-precision merged model is (local cache path)
    cache_key: str
    quantization: str = "none"  # the recipe's quantization.scheme
    weights: tuple[float, ...] | None = None  # per adapter; None = the recipe's `weight`s
    hot: str | None = None  # mode hybrid: the merged adapter ...
    delta_dir: str | None = None  # ... and where the delta adapters of the others are written
    quantize_scheme: str | None = None  # offline scheme produced from the merged weights (int8|w8a16|w4a16|fp8)
    quantized_dir: str | None = None  # ... and where that checkpoint is served from (None: output_dir)
    quantize_method: str | None = None  # rtn | gptq | awq (peftdeploy.quantize.methods.resolve_method)

    @property
    def served_dir(self) -> str:
        """The model directory vLLM serves."""
        return self.quantized_dir or self.output_dir


@dataclass(frozen=True)
class LaunchSpec:
    recipe_name: str
    recipe_hash: str
    mode: str  # "serve" | "merge" (auto is decided by plan)
    model: str  # what vLLM serves: local dir (resolved) or merged output dir
    model_source: str  # the backbone as written in the recipe (for renderers that fetch in-cluster)
    served_model_name: str  # name of the base / merged model in /v1/models
    host: str
    port: int
    device: str  # "cuda" | "cpu"
    tensor_parallel_size: int = 1
    # vLLM engine/server flags in a stable order: ("--max-loras", "4"), ("--enable-lora", None)
    args: tuple[tuple[str, str | None], ...] = ()
    adapters: tuple[ServedAdapter, ...] = ()
    env: tuple[tuple[str, str], ...] = ()  # non-secret environment for the server
    # server env var -> environment variable it is read from, e.g. ("VLLM_API_KEY", "PEFTDEPLOY_API_KEY")
    secret_env: tuple[tuple[str, str], ...] = ()
    merge: MergeStep | None = None
    plugin_recipe: str | None = None  # recipe path handed to the vLLM plugin (PEFTDEPLOY_RECIPE)
    extra: dict[str, Any] = field(default_factory=dict)

    def flags(self) -> list[str]:
        out: list[str] = []
        for k, v in self.args:
            out.append(k)
            if v is not None:
                out.append(v)
        return out

    def argv(self, executable: tuple[str, ...] = ("peftdeploy-vllm",)) -> list[str]:
        """The full command line: `<executable> serve MODEL <flags>`."""
        return [*executable, "serve", self.model, *self.flags()]

    def command_line(self, executable: tuple[str, ...] = ("peftdeploy-vllm",)) -> str:
        env = " ".join(f"{k}={shlex.quote(v)}" for k, v in self.env)
        sec = " ".join(f"{k}=${src}" for k, src in self.secret_env)
        cmd = shlex.join(self.argv(executable))
        return " ".join(x for x in (env, sec, cmd) if x)

    @property
    def lora_kernels(self) -> str | None:
        """The server's LORA_KERNELS_ENV (peftdeploy | vllm); None when no adapter is served as LoRA."""
        return dict(self.env).get(LORA_KERNELS_ENV)

    @property
    def model_names(self) -> list[str]:
        return [self.served_model_name, *(a.name for a in self.adapters)]

    def to_dict(self) -> dict[str, Any]:
        return {
            "recipe": self.recipe_name,
            "recipe_hash": self.recipe_hash,
            "mode": self.mode,
            "model": self.model,
            "model_source": self.model_source,
            "served_model_name": self.served_model_name,
            "host": self.host,
            "port": self.port,
            "device": self.device,
            "tensor_parallel_size": self.tensor_parallel_size,
            "argv": self.argv(),
            "env": dict(self.env),
            "secret_env": {k: f"${{{v}}}" for k, v in self.secret_env},
            "adapters": [asdict(a) for a in self.adapters],
            "merge": None if self.merge is None else asdict(self.merge),
            "command_line": self.command_line(),
        }
