"""Benchmark reports: percentiles, summaries overall and per adapter, tables, JSON and PNG plots.

``summarize`` is pure (standard library). Tables use ``rich`` when installed and plain text
otherwise; plots need ``matplotlib`` (Agg backend) and are skipped with a note when it is missing,
so the same module works on a bare GPU image.
"""
from __future__ import annotations

import json
import math
import statistics
from pathlib import Path
from typing import Any, Iterable, Sequence

from .client import RequestResult, RunResult
from .workload import BASE, Workload

__all__ = [
    "METRICS",
    "PERCENTILES",
    "percentile",
    "summarize",
    "summarize_runs",
    "median_summary",
    "render_table",
    "write_json",
    "plot_load_curve",
    "plot_per_adapter",
    "plot_compare",
    "format_table",
]

PERCENTILES = (50, 90, 99)
METRICS = ("ttft", "tpot", "itl", "e2e")


def percentile(values: Sequence[float], p: float) -> float | None:
    """The p-th percentile with linear interpolation (numpy's default); None for no values."""
    if not values:
        return None
    xs = sorted(values)
    if len(xs) == 1:
        return float(xs[0])
    k = (len(xs) - 1) * (p / 100.0)
    lo, hi = math.floor(k), math.ceil(k)
    if lo == hi:
        return float(xs[int(k)])
    return float(xs[lo] + (xs[hi] - xs[lo]) * (k - lo))


def _stats(values: Sequence[float]) -> dict[str, float | None]:
    out: dict[str, float | None] = {"mean": (sum(values) / len(values)) if values else None}
    for p in PERCENTILES:
        out[f"p{p}"] = percentile(values, p)
    return out


def _group(results: Sequence[RequestResult], wall_s: float) -> dict[str, Any]:
    ok = [r for r in results if r.ok]
    out_tok = sum(r.output_tokens for r in ok)
    in_tok = sum(r.prompt_tokens or 0 for r in ok)
    itls: list[float] = []
    for r in ok:
        itls.extend(r.itls)
    d: dict[str, Any] = {
        "requests": len(results),
        "ok": len(ok),
        "errors": len(results) - len(ok),
        "output_tokens": out_tok,
        "input_tokens": in_tok,
        "req_s": len(ok) / wall_s if wall_s > 0 else None,
        "output_tok_s": out_tok / wall_s if wall_s > 0 else None,
        "ttft_s": _stats([r.ttft_s for r in ok if r.ttft_s is not None]),
        "tpot_s": _stats([r.tpot_s for r in ok if r.tpot_s is not None]),
        "itl_s": _stats(itls),
        "e2e_s": _stats([r.e2e_s for r in ok if r.e2e_s is not None]),
    }
    return d


def summarize(run: RunResult, workload: Workload | None = None) -> dict[str, Any]:
    """Throughput and latency percentiles overall and per adapter (per-adapter throughput is that
    adapter's share of the run's wall time, so the per-adapter numbers add up to the total)."""
    overall = _group(run.results, run.wall_s)
    overall["wall_s"] = run.wall_s
    overall["total_tok_s"] = ((overall["output_tokens"] + overall["input_tokens"]) / run.wall_s
                              if run.wall_s > 0 else None)
    labels: list[str] = []
    for r in run.results:
        if r.adapter not in labels:
            labels.append(r.adapter)
    if workload is not None:  # workload order: hottest adapter first, base last
        order = [a for a in workload.config.adapters if a in labels]
        labels = order + [x for x in labels if x not in order]
    per = {a: _group([r for r in run.results if r.adapter == a], run.wall_s) for a in labels}
    errors: dict[str, int] = {}
    for r in run.results:
        if not r.ok:
            key = (r.error or "?")[:120]
            errors[key] = errors.get(key, 0) + 1
    out: dict[str, Any] = {
        "url": run.url,
        "backend": run.backend,
        "started_at": run.started_at,
        "overall": overall,
        "per_adapter": per,
        "error_messages": errors,
    }
    if workload is not None:
        out["workload"] = workload.config.to_dict()
    return out


def _get(d: dict[str, Any], path: str) -> Any:
    for k in path.split("."):
        if not isinstance(d, dict):
            return None
        d = d.get(k)  # type: ignore[assignment]
    return d


def _median(xs: Iterable[Any]) -> float | None:
    vals = [x for x in xs if isinstance(x, (int, float))]
    return statistics.median(vals) if vals else None


def _median_group(groups: Sequence[dict[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key in ("requests", "ok", "errors", "output_tokens", "input_tokens", "req_s", "output_tok_s",
                "total_tok_s", "wall_s"):
        if any(key in g for g in groups):
            out[key] = _median(g.get(key) for g in groups)
    for m in METRICS:
        k = f"{m}_s"
        out[k] = {s: _median(_get(g, f"{k}.{s}") for g in groups) for s in ("mean", *[f"p{p}" for p in PERCENTILES])}
    return out


def median_summary(summaries: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """Element-wise median of several runs' summaries (same workload), overall and per adapter."""
    if not summaries:
        return {}
    labels: list[str] = []
    for s in summaries:
        for a in s.get("per_adapter", {}):
            if a not in labels:
                labels.append(a)
    return {
        "runs": len(summaries),
        "overall": _median_group([s["overall"] for s in summaries]),
        "per_adapter": {a: _median_group([s["per_adapter"][a] for s in summaries if a in s.get("per_adapter", {})])
                        for a in labels},
        "errors_total": sum(s["overall"]["errors"] for s in summaries),
    }


def summarize_runs(runs: Sequence[RunResult], workload: Workload | None = None) -> dict[str, Any]:
    summaries = [summarize(r, workload) for r in runs]
    return {"runs": summaries, "median": median_summary(summaries)}


# ------------------------------------------------------------------------------------ tables
def _ms(x: Any) -> str:
    return "-" if x is None else f"{x * 1000:.0f}" if x >= 1 else f"{x * 1000:.1f}"


def _num(x: Any, fmt: str = "{:.1f}") -> str:
    return "-" if x is None else fmt.format(x)


def summary_rows(summary: dict[str, Any]) -> tuple[list[str], list[list[str]]]:
    """Rows of the per-adapter table (overall last). ``summary`` is a summarize()/median result."""
    head = ["model", "ok/n", "req/s", "out tok/s", "TTFT ms p50/90/99", "TPOT ms p50/90/99", "e2e ms p50/90/99"]
    rows = []

    def row(name: str, g: dict[str, Any]) -> list[str]:
        def trip(m: str) -> str:
            return "/".join(_ms(_get(g, f"{m}_s.p{p}")) for p in PERCENTILES)

        ok = g.get("ok")
        n = g.get("requests")
        return [name, f"{_num(ok, '{:.0f}')}/{_num(n, '{:.0f}')}", _num(g.get("req_s"), "{:.2f}"),
                _num(g.get("output_tok_s")), trip("ttft"), trip("tpot"), trip("e2e")]

    for a, g in summary.get("per_adapter", {}).items():
        rows.append(row(a if a != BASE else "base", g))
    rows.append(row("ALL", summary["overall"]))
    return head, rows


def format_table(head: Sequence[str], rows: Sequence[Sequence[str]], title: str | None = None) -> str:
    """Plain-text (markdown-style) table."""
    widths = [max(len(str(h)), *(len(str(r[i])) for r in rows)) for i, h in enumerate(head)]
    line = lambda cells: "| " + " | ".join(str(c).ljust(w) for c, w in zip(cells, widths)) + " |"  # noqa: E731
    out = [title] if title else []
    out += [line(head), "|" + "|".join("-" * (w + 2) for w in widths) + "|"]
    out += [line(r) for r in rows]
    return "\n".join(out)


def render_table(head: Sequence[str], rows: Sequence[Sequence[str]], title: str | None = None,
                 console: Any = None) -> None:
    """Print a table with rich when available, plain text otherwise."""
    try:
        from rich.console import Console
        from rich.table import Table
    except ImportError:
        print(format_table(head, rows, title))
        return
    t = Table(title=title, show_lines=False)
    for i, h in enumerate(head):
        t.add_column(h, justify="left" if i == 0 else "right")
    for r in rows:
        t.add_row(*[str(c) for c in r])
    if console is None:
        console = Console(highlight=False)
        if not console.is_terminal:  # files / pipes: don't squeeze the table into 80 columns
            console = Console(highlight=False, width=160)
    console.print(t)


def write_json(obj: Any, path: str | Path) -> Path:
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    p.write_text(json.dumps(obj, indent=2, default=str) + "\n")
    return p


# ------------------------------------------------------------------------------------- plots
def _plt() -> Any:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        return plt
    except ImportError:
        return None



def _vllm_title(title: str, vllm_version: str | None) -> str:
    """The title with the vLLM release the run served with ("installed": this machine's)."""
    if vllm_version == "installed":
        from ..plan.kernels import installed_vllm_version

        vllm_version = installed_vllm_version()
    return f"{title} — vLLM {vllm_version}" if vllm_version else title


def _tick_names(names: Sequence[str], width: int = 16) -> list[str]:
    """Setup names wrapped onto lines of `width` characters, so neighbouring tick labels do not overlap."""
    import textwrap

    return ["\n".join(textwrap.wrap(n, width, break_long_words=False, break_on_hyphens=False)) or n for n in names]


def compare_figure(rows: Sequence[dict[str, Any]], title: str, vllm_version: str | None = "installed") -> tuple[Any, Any]:
    """(plt, figure) of `plot_compare`: throughput (higher is better), TTFT / TPOT (lower is better)."""
    plt = _plt()
    if plt is None or not rows:
        return plt, None
    names = _tick_names([r["setup"] for r in rows])
    idx = list(range(len(rows)))
    fig, axes = plt.subplots(1, 3, figsize=(max(16, 1.3 * 3 * len(rows)), 5))
    tps = [r.get("output_tok_s") or 0 for r in rows]
    lo = [t - min(r.get("runs_tok_s") or [t]) for t, r in zip(tps, rows)]
    hi = [max(r.get("runs_tok_s") or [t]) - t for t, r in zip(tps, rows)]
    bars = axes[0].bar(idx, tps, yerr=[lo, hi], capsize=4, color="tab:blue")
    for b, r, up in zip(bars, rows, hi):
        if r.get("ratio") is not None:  # above the error bar, not on it
            axes[0].annotate(f"{r['ratio']:.2f}x", (b.get_x() + b.get_width() / 2, b.get_height() + up),
                             ha="center", va="bottom", fontsize=8, xytext=(0, 3), textcoords="offset points")
    axes[0].margins(y=0.12)
    axes[0].set_title("throughput (median; bars: min..max; labels: ratio to the first)")
    axes[0].set_ylabel("output tokens/s — higher is better")
    for ax, key, name in ((axes[1], "ttft_p50", "TTFT p50"), (axes[2], "tpot_p50", "TPOT p50")):
        ax.bar(idx, [(r.get(key) or 0) * 1000 for r in rows], color="tab:orange" if "ttft" in key else "tab:green")
        ax.set_title(name)
        ax.set_ylabel(f"{name}, ms — lower is better")
    for ax in axes:
        ax.set_xticks(idx)
        ax.set_xticklabels(names, rotation=0, ha="center", fontsize=8)
        ax.grid(alpha=0.3, axis="y")
    fig.suptitle(_vllm_title(title, vllm_version))
    fig.tight_layout()
    return plt, fig


def _save(plt: Any, fig: Any, title: str | None, path: str | Path) -> Path:
    """Title (None: already set), tight layout, write the PNG (parents created), close the figure."""
    if title is not None:
        fig.suptitle(title)
    fig.tight_layout()
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(p, dpi=110)
    plt.close(fig)
    return p

def plot_wall_bars(rows: Sequence[tuple[str, float]], path: str | Path, title: str,
                   ref: tuple[str, float] | None = None, limit: float | None = None) -> Path | None:
    """Wall time per run as horizontal bars (log scale), with the reference run's time and a
    limit (e.g. 1.5x the reference) as vertical lines. None when matplotlib is missing."""
    plt = _plt()
    if plt is None:
        return None
    fig, ax = plt.subplots(figsize=(9, 0.45 * len(rows) + 1.6))
    names = [n for n, _ in rows][::-1]
    vals = [v for _, v in rows][::-1]
    bars = ax.barh(names, vals, color=["#999999" if n.split(" ")[0] in ("peft", "PEFT", "mergekit") else "#4c72b0"
                                       for n in names])
    for b, v in zip(bars, vals):
        ax.text(v * 1.05, b.get_y() + b.get_height() / 2, f"{v:.2f} s", va="center", fontsize=8)
    if ref is not None:
        ax.axvline(ref[1], color="k", lw=1, ls="--", label=f"{ref[0]} {ref[1]:.2f} s")
    if limit is not None:
        ax.axvline(limit, color="#c44e52", lw=1, ls=":", label=f"target {limit:.2f} s")
    ax.set_xscale("log")
    ax.set_xlim(right=max(vals) * 3)
    ax.set_xlabel("wall time, s (log scale) — lower is better")
    if ref is not None or limit is not None:
        ax.legend(loc="upper right", fontsize=8)
    return _save(plt, fig, title, path)


def plot_load_curve(points: Sequence[dict[str, Any]], path: str | Path, title: str = "latency vs load") -> Path | None:
    """Latency (TTFT and e2e p50/p99) and TPOT against achieved throughput, one point per load level.

    ``points``: [{"label": "c=4", "load": 4, "summary": <summarize()/median overall dict>}, ...]
    """
    plt = _plt()
    if plt is None or not points:
        return None
    xs = [_get(p, "summary.output_tok_s") or 0 for p in points]
    fig, axes = plt.subplots(1, 3, figsize=(14, 4))
    for ax, m, name in zip(axes, ("ttft", "tpot", "e2e"), ("TTFT", "TPOT", "end-to-end")):
        for pct, style in ((50, "o-"), (99, "s--")):
            ys = [(_get(p, f"summary.{m}_s.p{pct}") or 0) * 1000 for p in points]
            ax.plot(xs, ys, style, label=f"p{pct}")
        for x, p in zip(xs, points):
            ax.annotate(str(p.get("label", "")), (x, (_get(p, f"summary.{m}_s.p50") or 0) * 1000),
                        textcoords="offset points", xytext=(4, 4), fontsize=8)
        ax.set_xlabel("output tokens/s (achieved)")
        ax.set_ylabel(f"{name} (ms)")
        ax.set_title(name)
        ax.grid(alpha=0.3)
        ax.legend()
    return _save(plt, fig, title, path)


def plot_per_adapter(summary: dict[str, Any], path: str | Path, title: str = "per adapter") -> Path | None:
    """Bars per adapter: request count, TTFT p50/p99, TPOT p50/p99, e2e p50/p99."""
    plt = _plt()
    if plt is None:
        return None
    per = summary.get("per_adapter", {})
    if not per:
        return None
    names = list(per)
    fig, axes = plt.subplots(1, 4, figsize=(16, 4))
    axes[0].bar(names, [per[a].get("ok") or 0 for a in names], color="tab:gray")
    axes[0].set_title("requests (ok)")
    for ax, m, name in zip(axes[1:], ("ttft", "tpot", "e2e"), ("TTFT", "TPOT", "end-to-end")):
        w = 0.4
        idx = list(range(len(names)))
        ax.bar([i - w / 2 for i in idx], [(_get(per[a], f"{m}_s.p50") or 0) * 1000 for a in names], w, label="p50")
        ax.bar([i + w / 2 for i in idx], [(_get(per[a], f"{m}_s.p99") or 0) * 1000 for a in names], w, label="p99")
        ax.set_xticks(idx)
        ax.set_xticklabels(names)
        ax.set_title(f"{name} (ms)")
        ax.legend()
    for ax in axes:
        ax.tick_params(axis="x", rotation=30)
        ax.grid(alpha=0.3, axis="y")
    return _save(plt, fig, title, path)


def plot_compare(rows: Sequence[dict[str, Any]], path: str | Path, title: str = "policy comparison",
                 vllm_version: str | None = "installed") -> Path | None:
    """Bars per setup: output tok/s (with the min..max of the runs) and TTFT / TPOT p50; the title names the
    vLLM release (`vllm_version`; "installed": this machine's).

    ``rows``: [{"setup": name, "output_tok_s": median, "runs_tok_s": [...], "ttft_p50": s, "tpot_p50": s,
    "ratio": x}, ...]
    """
    plt, fig = compare_figure(rows, title, vllm_version)
    if fig is None:
        return None
    return _save(plt, fig, None, path)
