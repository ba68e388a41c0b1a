"""Which LoRA compute serves, as each engine worker decided it at start: for the API server's discovery route
(GET /v1/kdlora/adapters, `lora_path`) and for anyone reading a server's state.

On CUDA each worker checks kdlora's kernels against vLLM's stock ones before the engine takes requests and falls
back to the stock kernels on a failure (kdlora_serve.worker.kernel_check); only the worker knows the outcome. It
writes it as a small JSON file into a folder named by KDLORA_LORA_REPORT, which the plugin sets in the first vLLM
process (the API server) so that the engine's processes inherit it, as kdlora_serve.elastic names its table.
Imported by both processes.
"""

import atexit
import json
import os
import shutil
import tempfile
from pathlib import Path

ENV = "KDLORA_LORA_REPORT"
KDLORA_TRITON, STOCK_MASKED = "kdlora-triton", "vllm-stock-masked"  # the two CUDA paths a worker can serve with


def set_path() -> None:
    """Name this server's report folder for this process and the processes it starts (idempotent; the plugin calls
    it). The process that makes the folder removes it at exit."""
    if ENV not in os.environ:
        folder = tempfile.mkdtemp(prefix="kdlora-lora-report-")
        os.environ[ENV] = folder
        atexit.register(shutil.rmtree, folder, True)


def write(report: dict) -> None:
    """This worker's report, whole or not at all (temp file, then rename). Without a folder (no plugin-started
    server: a test, a bare vllm.LLM) nobody reads it: nothing is written."""
    folder = os.environ.get(ENV)
    if not folder or not os.path.isdir(folder):
        return
    final = Path(folder) / f"worker-{os.getpid()}.json"
    partial = final.with_suffix(".partial")
    partial.write_text(json.dumps(report))
    os.replace(partial, final)


def read() -> list[dict]:
    """Every worker's report so far (none before the engine has started)."""
    folder = os.environ.get(ENV)
    if not folder:
        return []
    return [json.loads(path.read_text()) for path in sorted(Path(folder).glob("worker-*.json"))]


def describe() -> dict:
    """The LoRA path this server serves with: its backend, the kernels, and on CUDA each worker's self-check."""
    from kdlora_serve import vllm_patches

    backend = vllm_patches.backend()
    if backend == "cpu":
        return {"backend": "cpu", "kernels": "kdlora-grouped"}
    platform = vllm_patches.platform()
    if backend is None:
        return {"backend": platform, "kernels": "vllm-stock", "reason": vllm_patches.unsupported_reason(platform)}
    workers = read()
    kernels = "unchecked" if not workers else KDLORA_TRITON
    if any(worker["kernels"] == STOCK_MASKED for worker in workers):  # one worker's fallback is the server's
        kernels = STOCK_MASKED
    return {"backend": "cuda", "kernels": kernels, "workers": workers}
