"""Triton's interpreter on CPU tensors, for vLLM's GPU LoRA kernels and kdlora's (correctness only, ~1 s a call).

Run in a pytest process of its own (tests/test_lora_triton.py starts one with --confcutdir here): the interpreter
and a stand-in CPU backend must be in place before vLLM decides whether Triton is usable, and the rest of the
suite must keep vLLM's CPU decision. Recipe: ../shared/ENVIRONMENT.md, "Testing vLLM's GPU (Triton) LoRA kernels".
"""

import os
from types import SimpleNamespace

os.environ["TRITON_INTERPRET"] = "1"  # read when a kernel is decorated, so before any kernel module is imported

import triton  # noqa: E402

# vllm.triton_utils reports Triton unusable without an active backend ("doesn't include CPU backend")
triton.backends.backends.setdefault("cpu", SimpleNamespace(driver=SimpleNamespace(is_active=lambda: True)))
