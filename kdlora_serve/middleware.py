"""`vllm serve --middleware kdlora_serve.middleware.KdloraMiddleware`, as earlier READMEs spelled it, keeps working: the
middleware itself lives with the rest of the API-server code in kdlora_serve.api.middleware."""

from kdlora_serve.api.middleware import KdloraMiddleware

__all__ = ["KdloraMiddleware"]
