"""pytest plugin for running vLLM's own tests/lora against kdlora (loaded with -p by test_vllm_upstream.py).

It installs kdlora's vLLM patches (with its CPU LoRA path) before vLLM's tests import anything, and supplies the two things vLLM's
top-level tests/conftest.py would (it is not loaded: it needs vLLM's whole test toolchain): the
`default_vllm_config` fixture, and a stand-in for Ray, whose shutdown vLLM's cleanup calls.
"""

import os
import sys
import types

import pytest

if os.environ.get("KDLORA_RANK_AWARE", "1") != "0":
    from kdlora_serve import vllm_patches

    assert vllm_patches.install() == "cpu", "kdlora's CPU LoRA path did not install"
sys.modules.setdefault("ray", types.SimpleNamespace(shutdown=lambda: None))


@pytest.fixture
def default_vllm_config():
    from vllm.config import VllmConfig, set_current_vllm_config

    config = VllmConfig()
    with set_current_vllm_config(config):
        yield config
