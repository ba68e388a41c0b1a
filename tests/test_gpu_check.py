"""benchmarks/gpu_check.sh --dry-run: the GPU check's plan, and every file and command it would use, checked on any
machine (the real run needs a CUDA GPU)."""

import shutil
import subprocess

from conftest import REPO


def dry_run(root) -> subprocess.CompletedProcess:
    return subprocess.run(
        ["bash", str(root / "benchmarks" / "gpu_check.sh"), "--dry-run", "/tmp/gpu-check-out"],
        capture_output=True,
        text=True,
        timeout=60,
    )


def test_the_dry_run_prints_a_bounded_plan_and_finds_everything():
    result = dry_run(REPO)
    assert result.returncode == 0, result.stderr
    plan = [line.split(":")[1].strip() for line in result.stdout.splitlines() if line.startswith("plan: ")]
    assert plan == [
        "setup (<= 150 s)",
        "doctor (<= 30 s)",
        "kernels (<= 90 s)",
        "serve (<= 210 s)",
        "at most 480 s; logs and summary.txt in /tmp/gpu-check-out",
    ]
    assert result.stdout.splitlines()[-1] == "dry run: every file and command is here"


def test_the_dry_run_fails_loudly_on_a_missing_file(tmp_path):
    shutil.copytree(REPO / "benchmarks", tmp_path / "benchmarks", ignore=shutil.ignore_patterns("results", ".work"))
    shutil.copytree(REPO / "scripts", tmp_path / "scripts")
    (tmp_path / "tests").mkdir()
    shutil.copy(REPO / "pyproject.toml", tmp_path)
    result = dry_run(tmp_path)
    assert result.returncode == 1
    assert f"missing: {tmp_path}/tests/test_cuda_kernels.py" in result.stderr.splitlines()
