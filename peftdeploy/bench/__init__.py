"""Benchmark: a multi-LoRA load generator (workload, client, report) and the policy comparison.

``workload``, ``client`` and ``report`` need only the standard library plus aiohttp or httpx
(matplotlib / rich optional), so they run next to vLLM on a bare GPU image too.
"""
