"""kdlora_serve.lora_report: what each engine worker says serves, as the API server's discovery route reports it."""

import json
import os

import pytest

pytest.importorskip("vllm")
from vllm.platforms import current_platform  # noqa: E402

from kdlora_serve import lora_report, vllm_patches  # noqa: E402


@pytest.fixture
def folder(tmp_path, monkeypatch):
    monkeypatch.setenv(lora_report.ENV, str(tmp_path))
    return tmp_path


def test_each_worker_report_is_written_whole_and_read_back(folder):
    lora_report.write({"kernels": "kdlora-triton", "failure": None})
    assert [p.name for p in folder.iterdir()] == [f"worker-{os.getpid()}.json"]  # no partial file left
    assert lora_report.read() == [{"kernels": "kdlora-triton", "failure": None}]


def test_without_a_folder_nothing_is_written_or_read(monkeypatch, tmp_path):
    monkeypatch.delenv(lora_report.ENV, raising=False)
    lora_report.write({"kernels": "kdlora-triton"})
    assert lora_report.read() == []


def test_one_worker_that_fell_back_makes_the_server_report_stock_kernels(folder, monkeypatch):
    monkeypatch.setattr(vllm_patches, "_backend", ["cuda"])
    monkeypatch.setattr(current_platform, "is_cuda", lambda: True)
    assert lora_report.describe() == {"backend": "cuda", "kernels": "unchecked", "workers": []}
    workers = [
        {"kernels": "kdlora-triton", "failure": None},
        {"kernels": "vllm-stock-masked", "failure": "linear 576->1536: kdlora's kernels raised RuntimeError: x"},
    ]
    for number, report in enumerate(workers):
        (folder / f"worker-{number}.json").write_text(json.dumps(report))
    assert lora_report.describe() == {"backend": "cuda", "kernels": "vllm-stock-masked", "workers": workers}
    (folder / "worker-1.json").unlink()
    assert lora_report.describe()["kernels"] == "kdlora-triton"


def test_cpu_and_stock_servers_say_what_serves(monkeypatch):
    monkeypatch.setattr(vllm_patches, "_backend", ["cpu"])
    assert lora_report.describe() == {"backend": "cpu", "kernels": "kdlora-grouped"}
    monkeypatch.setattr(vllm_patches, "_backend", [])
    monkeypatch.setenv("KDLORA_RANK_AWARE", "0")
    assert lora_report.describe() == {"backend": "cpu", "kernels": "vllm-stock", "reason": "KDLORA_RANK_AWARE=0"}
