"""The serving side's request error, shared by the rank protocol (kdlora_serve.rank) and the API server."""

from hub.errors import KdloraError


class RequestError(KdloraError):
    """A bad request: becomes an OpenAI-style JSON error with this HTTP status."""

    def __init__(self, message: str, status: int = 400, param: str | None = None, headers=None, details=None):
        super().__init__(message)
        self.status, self.param = status, param
        self.headers: dict[str, str] = headers or {}  # e.g. Retry-After
        self.details: dict | None = details  # kdlora's numbers behind the error, sent as the body's "kdlora" field
