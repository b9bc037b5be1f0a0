"""Calibration text for calibrated quantization (GPTQ, AWQ, SmoothQuant) — pure, no torch.

    cs = load_calibration(recipe.quantization.calibration)   # CalibrationSet (text + identity)
    cs.identity   # {"dataset": ..., "sha256": ..., "samples": 64, "seq_len": 512} -> cache key, provenance

The shipped set ``builtin://mixed-prose`` is ``peftdeploy/data/calibration/mixed-prose.txt``:
original prose written for this repository (CC0 1.0, like the eval text), pinned by
:data:`BUILTIN_SHA256` and disjoint from the eval text ``peftdeploy/data/eval/lighthouse.txt``
(a test checks that no 8-word run of one appears in the other). A team names its own with
``quantization.calibration.dataset: ./my-text.txt`` (plain text) or ``./my.jsonl`` (one JSON object
a line with a ``"text"`` string), optionally pinned by ``sha256``.
"""
from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from peftdeploy.errors import PeftDeployError

BUILTIN_PREFIX = "builtin://"
BUILTIN: dict[str, tuple[str, str]] = {  # name -> (file under data/calibration, sha256)
    "mixed-prose": ("mixed-prose.txt", "ff3523f2b5252aa963fb17d9b3b211562de8367141217a8d8672560d5fa299ad"),
}
DEFAULT_DATASET = BUILTIN_PREFIX + "mixed-prose"


class CalibrationError(PeftDeployError):
    pass


def data_dir() -> Path:
    return Path(__file__).resolve().parent.parent / "data" / "calibration"


@dataclass(frozen=True)
class CalibrationSet:
    dataset: str  # as written (builtin://name or an absolute path)
    text: str
    sha256: str  # of the dataset file's bytes
    samples: int
    seq_len: int

    @property
    def identity(self) -> dict[str, Any]:
        """What the quantized weights depend on: goes into the quantize cache key and provenance."""
        return {"dataset": self.dataset, "sha256": self.sha256, "samples": self.samples, "seq_len": self.seq_len}


def _jsonl_text(path: Path, raw: bytes) -> str:
    parts = []
    for i, line in enumerate(raw.decode("utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except ValueError as e:
            raise CalibrationError(f"{path}:{i}: not JSON ({e})",
                                   fix='write one object a line, e.g. {"text": "..."}') from None
        if not isinstance(obj, dict) or not isinstance(obj.get("text"), str):
            raise CalibrationError(f"{path}:{i}: each line needs a \"text\" string",
                                   fix='write one object a line, e.g. {"text": "..."}')
        parts.append(obj["text"])
    return "\n\n".join(parts)


def load_calibration(cal: Any = None, *, dataset: str | None = None, samples: int | None = None,
                     seq_len: int | None = None, sha256: str | None = None) -> CalibrationSet:
    """The calibration set a recipe's ``quantization.calibration`` names (None: the default)."""
    ds = dataset or (cal.dataset if cal is not None else DEFAULT_DATASET)
    pin = sha256 or (cal.sha256 if cal is not None else None)
    n = int(samples or (cal.samples if cal is not None else 64))
    L = int(seq_len or (cal.seq_len if cal is not None else 512))
    where = "quantization.calibration.dataset"
    if ds.startswith(BUILTIN_PREFIX):
        name = ds[len(BUILTIN_PREFIX):]
        if name not in BUILTIN:
            raise CalibrationError(f"{where}: no shipped calibration set {ds!r}",
                                   fix=f"use one of {', '.join(BUILTIN_PREFIX + k for k in BUILTIN)}, or a path "
                                       "to a .txt / .jsonl file")
        fn, want = BUILTIN[name]
        raw = (data_dir() / fn).read_bytes()
        got = hashlib.sha256(raw).hexdigest()
        if got != want:  # the package was modified: numbers would not be comparable
            raise CalibrationError(f"the shipped calibration set {data_dir() / fn} has sha256 {got}, not the "
                                   f"pinned {want}", fix="reinstall peftdeploy")
        if pin and pin != got:
            raise CalibrationError(f"quantization.calibration.sha256 is {pin}, but {ds} has {got}",
                                   fix="drop sha256 for a shipped set, or correct it")
        return CalibrationSet(ds, raw.decode("utf-8"), got, n, L)
    p = Path(ds)
    if "://" in ds:
        raise CalibrationError(f"{where}: {ds!r} is neither a shipped set nor a local file",
                               fix=f"use {DEFAULT_DATASET} or a local .txt / .jsonl path")
    if not p.is_file():
        raise CalibrationError(f"{where}: {p} does not exist", fix="fix the path (relative to the recipe file)")
    raw = p.read_bytes()
    got = hashlib.sha256(raw).hexdigest()
    if pin and pin != got:
        raise CalibrationError(f"{where}: {p} has sha256 {got}, the recipe pins {pin}",
                               fix="point at the pinned file, or update quantization.calibration.sha256")
    try:
        text = _jsonl_text(p, raw) if p.suffix.lower() == ".jsonl" else raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise CalibrationError(f"{where}: {p} is not UTF-8 text ({e})", fix="use a UTF-8 .txt or .jsonl") from None
    if len(text.split()) < 50:
        raise CalibrationError(f"{where}: {p} has only {len(text.split())} words: too little to calibrate on",
                               fix="give at least a few thousand words of text like what the model will see")
    return CalibrationSet(str(p), text, got, n, L)
