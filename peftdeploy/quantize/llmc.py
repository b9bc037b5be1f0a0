"""Calibrated quantization with llm-compressor, run as a subprocess in its own tool venv.

    res = quantize_llmc(merged_dir, out_dir, "w4a16", "gptq", calibration=load_calibration())

The worker (:mod:`.llmc_worker`, started by file path with the tool venv's python) loads the merged
model with transformers, runs ``llmcompressor.oneshot`` and writes a compressed-tensors checkpoint.
Its ``peftdeploy-progress:`` lines are handed to `progress`; everything it prints is kept in
``<out>.log`` while it runs and its tail is quoted in the error when it fails or passes `timeout`
(then the process group is killed and nothing is kept).
"""
from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import tempfile
import threading
import time
from collections import deque
from pathlib import Path
from typing import Any, Callable

from peftdeploy.errors import MergeError
from peftdeploy.quantize.calibration import CalibrationSet
from peftdeploy.quantize.methods import require_tool

WORKER = Path(__file__).resolve().parent / "llmc_worker.py"
DEFAULT_TIMEOUT = float(os.environ.get("PEFTDEPLOY_QUANTIZE_TIMEOUT", 3600))
TOOL_VERSION = "llmcompressor==0.14.0.1;worker=1"  # what setup_quantize.sh installs + llmc_worker.py recipes (cache key)


class QuantizeToolError(MergeError):
    pass


def _group_size(src: Path, scheme: str, requested: int) -> int | None:
    if scheme != "w4a16":
        return None
    from peftdeploy.quantize.rtn import _open_source, choose_group_size, is_quantizable

    s = _open_source(src)
    dims = [t.shape[1] for n, t in s.tensors.items() if is_quantizable(n, t.shape)]
    return choose_group_size(dims, requested)


def quantize_llmc(src_dir: str | os.PathLike[str], out_dir: str | os.PathLike[str], scheme: str, method: str, *,
                  calibration: CalibrationSet | None, group_size: int = 128,
                  progress: Callable[[str], None] | None = None, timeout: float | None = None,
                  provenance: dict[str, Any] | None = None, threads: int | None = None) -> dict[str, Any]:
    """Quantize `src_dir` into the new directory `out_dir`; returns the provenance written there."""
    py = require_tool(f"quantization method {method} ({scheme})")
    src, out = Path(src_dir), Path(out_dir)
    if out.exists() and any(out.iterdir()):
        raise MergeError(f"{out} is not empty", fix="choose an empty or new output directory")
    g = _group_size(src, scheme, group_size)
    timeout = DEFAULT_TIMEOUT if timeout is None else timeout
    say = progress or (lambda m: None)
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="peftdeploy-llmc-") as td:
        job: dict[str, Any] = {"src": str(src), "out": str(out), "scheme": scheme, "method": method, "group_size": g,
                               "threads": threads or min(os.cpu_count() or 1, 8)}
        if calibration is not None and method in ("gptq", "awq"):
            tf = Path(td) / "calibration.txt"
            tf.write_text(calibration.text, encoding="utf-8")
            job["calibration"] = {"text_file": str(tf), "samples": calibration.samples, "seq_len": calibration.seq_len}
        jf = Path(td) / "job.json"
        jf.write_text(json.dumps(job))
        log = Path(td) / "llmc.log"
        env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
        env.update(HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
        tail: deque[str] = deque(maxlen=40)
        result: dict[str, Any] = {}
        with open(log, "w") as lf:
            p = subprocess.Popen([str(py), str(WORKER), str(jf)], stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                 env=env, cwd=td, text=True, errors="replace", start_new_session=True)

            def pump() -> None:
                assert p.stdout is not None
                for line in p.stdout:
                    lf.write(line)
                    line = line.rstrip("\n")
                    tail.append(line[-400:])
                    if line.startswith("peftdeploy-progress: "):
                        say(line[len("peftdeploy-progress: "):])
                    elif line.startswith("peftdeploy-result: "):
                        result.update(json.loads(line[len("peftdeploy-result: "):]))

            th = threading.Thread(target=pump, daemon=True)
            th.start()
            try:
                rc = p.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                os.killpg(p.pid, signal.SIGKILL)
                p.wait()
                rc = None
            th.join(10)
        if rc != 0 or not result:
            shutil.rmtree(out, ignore_errors=True)
            last = "\n    ".join(x for x in list(tail)[-12:] if x.strip())
            what = f"timed out after {timeout:.0f} s" if rc is None else f"failed (exit {rc})"
            raise QuantizeToolError(
                f"llm-compressor {method} {scheme} of {src} {what}; nothing was kept. Last output:\n    {last}",
                fix=("raise PEFTDEPLOY_QUANTIZE_TIMEOUT (seconds), lower quantization.calibration.samples, or use "
                     "quantization.method: rtn") if rc is None else
                    ("check the model is a plain decoder-only HF checkpoint; re-run `bash scripts/setup_quantize.sh`; "
                     "or use quantization.method: rtn"))
    merge_prov = src / "peftdeploy-provenance.json"
    if merge_prov.is_file():
        shutil.copyfile(merge_prov, out / "peftdeploy-merge-provenance.json")
    from peftdeploy.quantize.rtn import QUANT_PROVENANCE_FILE

    cfg = json.loads((out / "config.json").read_text()).get("quantization_config", {})
    prov = {"method": method, "scheme": scheme, "tool": result.get("tool"), "group_size": g,
            "calibration": calibration.identity if (calibration is not None and method in ("gptq", "awq")) else None,
            "calibration_used": {k: result[k] for k in ("samples_used", "tokens_used", "text_tokens") if k in result},
            "source": str(src), "seconds": round(time.perf_counter() - t0, 2),
            "spec": {"group_size": g, "format": cfg.get("format")}, **(provenance or {})}
    (out / QUANT_PROVENANCE_FILE).write_text(json.dumps(prov, indent=2, sort_keys=True) + "\n")
    return prov
