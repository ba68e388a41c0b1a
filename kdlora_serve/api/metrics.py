"""Prometheus metrics next to vLLM's own on /metrics (same default registry, API-server process)."""

from prometheus_client import Counter, Histogram

REQUESTS = Counter("kdlora_requests", "Adapter requests served, by adapter and rank", ["adapter", "rank"])
TOKENS = Counter(
    "kdlora_generated_tokens", "Tokens generated for adapter requests, by adapter and rank", ["adapter", "rank"]
)
BUDGET_MISSES = Counter(
    "kdlora_budget_misses", "Requests whose budget no rank could meet (served at the cheapest rank)", ["adapter"]
)
PULLS = Counter("kdlora_adapter_pulls", "Adapters pulled and validated", ["adapter"])
TRUNCATIONS = Counter("kdlora_adapter_truncations", "Rank truncations written to the cache", ["adapter"])
PREPARE_SECONDS = Histogram("kdlora_adapter_prepare_seconds", "Seconds to pull or truncate an adapter", ["step"])
