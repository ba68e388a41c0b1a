"""kdlora's CUDA LoRA path (kdlora_serve/worker/lora_triton.py). Its kernels are checked in tests/triton_interp, in a
pytest process of its own: Triton's interpreter must be set up before vLLM decides whether Triton is usable,
which this process (vLLM's CPU build) must keep deciding as it does."""

import subprocess
import sys

import pytest
import torch

pytest.importorskip("vllm")
import vllm  # noqa: E402
from conftest import REPO  # noqa: E402
from vllm import triton_utils  # noqa: E402

from kdlora_serve import doctor, vllm_patches  # noqa: E402


@pytest.mark.triton_interpreter
def test_triton_kernels_under_the_interpreter():
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "pytest",
            "-p",
            "no:cacheprovider",
            "-q",
            "--confcutdir",
            "tests/triton_interp",
            "tests/triton_interp",
        ],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert result.returncode == 0, result.stdout[-6000:] + result.stderr[-2000:]
    print(result.stdout.splitlines()[-1])


def test_not_installed_off_cuda():
    assert vllm_patches.lora_backend() == "cpu"  # this process's platform: the CUDA rows never apply here


def test_doctor_says_which_lora_path_the_server_takes(monkeypatch):
    assert (
        doctor.check_lora_path() == "CPU: kdlora's grouped rank-aware path (base tokens exact, cost follows the rank)"
    )
    monkeypatch.setenv("KDLORA_RANK_AWARE", "0")
    assert (
        doctor.check_lora_path() == "CPU: vLLM's stock LoRA path, cost does not follow the rank (KDLORA_RANK_AWARE=0)"
    )
    monkeypatch.delenv("KDLORA_RANK_AWARE")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert (
        doctor.check_lora_path()
        == "CUDA: vLLM's stock LoRA path, cost does not follow the rank (vLLM finds Triton unusable)"
    )
    monkeypatch.setattr(triton_utils, "HAS_TRITON", True)
    assert doctor.check_lora_path() == (
        "CUDA: kdlora's rank-aware Triton kernels, checked against vLLM's stock kernels at each engine start "
        "(on a failure that engine serves vLLM's kernels; GET /v1/kdlora/adapters says which serve; no GPU run "
        "recorded: benchmarks/gpu_check.sh)"
    )
    monkeypatch.setattr(vllm, "__version__", "0.99.0")
    assert doctor.check_lora_path() == (
        "CUDA: vLLM's stock LoRA path, cost does not follow the rank (vLLM 0.99.0 is untested "
        "with kdlora's kernels (tested: 0.32.0))"
    )
    assert doctor.check_vllm_patches() == "none: vLLM 0.99.0 is untested (tested: 0.32.0); stock vLLM serves"
