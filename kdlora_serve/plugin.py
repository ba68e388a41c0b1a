"""vLLM general plugin: loaded in every vLLM process, so registration must be idempotent."""


def register() -> None:
    """Entry point `vllm.general_plugins:kdlora`. Nothing to register yet (see issue 6)."""
