"""What runs in vLLM's API-server process: the middleware (budget -> rank), the policy, the adapter store, the LoRA
resolver and the Prometheus metrics. Nothing here runs in the engine; nothing in kdlora_serve.worker imports it."""
