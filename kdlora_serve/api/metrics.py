"""Prometheus metrics next to vLLM's own on /metrics (same default registry, API-server process)."""

from prometheus_client import Counter, Gauge, Histogram

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
STEP_MODEL = Gauge(
    "kdlora_step_model_ms",
    "Fitted ms per decode step: base, per request in flight, per LoRA rank unit",
    ["term"],
)
REJECTIONS = Counter(
    "kdlora_budget_rejections",
    "Requests answered 429: no rank met their budget (on_miss reject, or wait timed out)",
    ["adapter"],
)
WAIT_SECONDS = Histogram(
    "kdlora_budget_wait_seconds", "Seconds a request with on_miss wait was held before admission", ["adapter"]
)
ELASTIC_LOWERINGS = Counter(
    "kdlora_elastic_lowerings",
    "Elastic requests lowered one evaluated rank while decoding, to keep in-flight latency budgets",
    ["adapter"],
)
