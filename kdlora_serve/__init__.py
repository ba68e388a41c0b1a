"""kdlora serving side: the vLLM plugin and the `kdlora` command line."""

__version__ = "0.1.0"
