"""`peftdeploy bench`: load-test a deployment, or compare deployment policies (--compare)."""
from __future__ import annotations

import dataclasses
import sys
from pathlib import Path
from typing import Any

import click

from ..cli_common import emit_json, json_option, stderr_console, user_errors
from ..errors import PeftDeployError


def _ints(s: str | None) -> list[float] | None:
    if not s:
        return None
    try:
        return [float(x) for x in s.split(",") if x.strip()]
    except ValueError:
        raise click.BadParameter(f"expected comma-separated numbers, got {s!r}") from None


@click.command("bench")
@click.argument("recipe", type=click.Path(exists=True, dir_okay=False))
@click.option("--url", help="A running deployment (e.g. from `peftdeploy up`); default: start the recipe's own.")
@click.option("--port", type=int, help="Port for the server bench starts (default: the recipe's).")
@click.option("--adapters", help="Adapters to send traffic to, hottest first (default: the recipe's, by policy.traffic).")
@click.option("--zipf", "zipf", type=float, default=1.0, show_default=True, help="Zipf α of adapter popularity (0 = uniform).")
@click.option("--base-share", type=float, help="Share of requests to the base model (default: policy.traffic.base or 0).")
@click.option("--rate", type=float, help="Poisson arrivals at this many requests/s (open loop).")
@click.option("--concurrency", type=int, help="Requests in flight (closed loop; with --rate: the cap).")
@click.option("--num-requests", "-n", type=int, default=64, show_default=True)
@click.option("--input-len", type=int, help="Synthetic prompts of this many words (default: the shipped prompt set).")
@click.option("--output-len", type=int, help="Output tokens per request (ignore_eos). Default: 64, or the prompt set's with --prompts.")
@click.option("--prompts", "prompts_file", type=click.Path(exists=True, dir_okay=False),
              help="JSONL prompt set ({\"prompt\": ..., \"output_len\": ...} per line).")
@click.option("--sweep", help="Comma-separated load levels (concurrencies, or rates with --rate): latency-vs-load curve.")
@click.option("--compare", is_flag=True, help="Run the policy comparison (merged / 1 adapter / N adapters at max_loras values).")
@click.option("--max-loras", "max_loras", help="With --compare: max_loras values for the N-adapter setups (default: N and N/2).")
@click.option("--runs", type=int, default=1, show_default=True, help="Measured runs per point (median reported); --compare uses >= 3.")
@click.option("--warmup", type=int, default=8, show_default=True, help="Warm-up requests before measuring.")
@click.option("--out", "out_dir", type=click.Path(file_okay=False), default="bench-out", show_default=True)
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--api-key-env", help="Environment variable holding the API key (default: the recipe's serving.api_key).")
@click.option("--backend", type=click.Choice(["auto", "aiohttp", "httpx"]), default="auto", show_default=True)
@json_option
@user_errors
def bench_cmd(recipe: str, url: str | None, port: int | None, adapters: str | None, zipf: float,
              base_share: float | None, rate: float | None, concurrency: int | None, num_requests: int,
              input_len: int | None, output_len: int | None, prompts_file: str | None, sweep: str | None,
              compare: bool, max_loras: str | None, runs: int, warmup: int, out_dir: str, seed: int,
              api_key_env: str | None, backend: str, as_json: bool) -> None:
    """Load-test RECIPE's deployment with a multi-LoRA workload (Zipf adapters, Poisson arrivals).

    Streams every request so TTFT and inter-token latency are real; reports throughput and
    TTFT / TPOT / end-to-end p50/p90/p99, overall and per adapter; writes JSON and PNG plots.
    """
    from ..bench import report
    from ..bench.compare import compare_table, hottest_first, run_compare, save_compare
    from ..bench.deploy import Server, merge_adapters, recipe_spec
    from ..bench.workload import WorkloadConfig, build_workload
    from ..bench.client import run_workload_sync
    from ..recipe import load_recipe

    err = stderr_console()
    log = (lambda m: err.print(m, markup=False))  # noqa: E731
    out = Path(out_dir)
    if rate is None and concurrency is None:
        concurrency = 8
    if output_len is None and prompts_file is None:
        output_len = 64
    loaded = load_recipe(recipe)
    r = loaded.recipe
    if api_key_env is None and r.serving.api_key.env:
        api_key_env = r.serving.api_key.env

    if compare:
        if url:
            raise PeftDeployError("--compare starts its own servers (one per setup); drop --url")
        ml = [int(x) for x in (_ints(max_loras) or [])] or None
        result = run_compare(recipe, out_dir=out, port=port or r.serving.port, zipf=zipf, concurrency=concurrency,
                             rate=rate, num_requests=num_requests, input_len=input_len, output_len=output_len,
                             prompts_file=prompts_file, runs=max(runs, 3), warmup_requests=warmup, seed=seed,
                             max_loras=ml, api_key_env=api_key_env, log=log, backend=backend)
        pj, pp = save_compare(result, out / "compare.json", out / "compare.png")
        if as_json:
            emit_json({k: v for k, v in result.items()})
        else:
            head, rows = compare_table(result)
            report.render_table(head, rows, title=f"{r.name}: policies compared (median of {result['runs']} runs)")
            log(f"wrote {pj}" + (f" and {pp}" if pp else ""))
        return

    names = [a.strip() for a in adapters.split(",")] if adapters else hottest_first(r)
    traffic = r.policy.traffic or {}
    share = base_share if base_share is not None else float(traffic.get("base", 0.0))
    server: Server | None = None
    try:
        if url is None:
            spec, _ = recipe_spec(recipe, port=port, mode=None)
            if spec.merge is not None and not Path(spec.model).is_dir():
                log(f"merging {', '.join(spec.merge.adapters)} ...")
                merge_adapters(loaded, list(spec.merge.adapters))
            server = Server(spec, log_path=out / "server.log")
            log(f"starting: {spec.command_line()}")
            server.start()
            log(f"ready in {server.ready_s:.0f} s")
            url = server.url
        from ..bench.client import served_models

        base, served_loras = served_models(url, api_key_env)
        if served_loras:
            missing = [n for n in names if n not in served_loras]
            if missing and not any(n in served_loras for n in names):
                log(f"note: {', '.join(missing)} not listed by the server (merged deployment?): "
                    f"sending all traffic to {base}")
                names, share = [], 1.0
        elif names:
            log(f"the server serves no adapters (merged deployment): sending all traffic to {base}")
            names, share = [], 1.0

        levels = _ints(sweep) or [rate if rate is not None else float(concurrency or 8)]
        points = []
        for lvl in levels:
            cfg = WorkloadConfig(
                adapters=tuple(names), base_model=base, zipf_alpha=zipf, base_share=share if names else 1.0,
                num_requests=num_requests,
                rate=lvl if rate is not None else None,
                concurrency=concurrency if rate is not None else int(lvl),
                input_len=input_len, output_len=output_len, prompts_file=prompts_file, seed=seed)
            if warmup:
                wcfg = dataclasses.replace(cfg, num_requests=warmup, seed=seed + 1000, rate=None,
                                           concurrency=cfg.concurrency or 8)
                run_workload_sync(url, build_workload(wcfg), api_key_env=api_key_env, backend=backend)
            summaries = []
            for i in range(runs):
                wl = build_workload(dataclasses.replace(cfg, seed=seed + i))  # run i: seed + i
                rr = run_workload_sync(url, wl, api_key_env=api_key_env, backend=backend)
                summaries.append(report.summarize(rr, wl))
            med = report.median_summary(summaries) if runs > 1 else summaries[0]
            label = (f"rate={lvl:g}" if rate is not None else f"c={int(lvl)}")
            points.append({"label": label, "load": lvl, "workload": cfg.to_dict(), "summary": med["overall"],
                           "median": med, "runs": summaries})
            if not as_json:
                head, rows = report.summary_rows(med)
                report.render_table(head, rows, title=f"{r.name} @ {label} ({cfg.num_requests} requests"
                                    + (f", median of {runs} runs" if runs > 1 else "") + ")")
        result: dict[str, Any] = {"recipe": recipe, "url": url, "base_model": base, "adapters": names,
                                  "server": None if server is None else {"argv": server.argv(),
                                                                         "ready_s": server.ready_s},
                                  "points": points}
        pj = report.write_json(result, out / "bench.json")
        png_a = report.plot_per_adapter(points[-1]["median"], out / "bench_adapters.png",
                                        title=f"{r.name} @ {points[-1]['label']}")
        png_l = report.plot_load_curve(points, out / "bench_load.png", title=f"{r.name}: latency vs load") \
            if len(points) > 1 else None
        errors = sum(p["summary"].get("errors", 0) or 0 for p in points)
        if as_json:
            emit_json(result)
        else:
            log(f"wrote {pj}" + "".join(f", {p}" for p in (png_a, png_l) if p))
        if errors:
            log(f"{errors:.0f} request(s) failed: {points[-1]['median'].get('error_messages') or points[-1]['runs'][-1]['error_messages']}")
            sys.exit(1)
    finally:
        if server is not None:
            server.stop()
