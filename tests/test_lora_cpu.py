"""The grouped CPU LoRA path: base tokens (slot -1) get no LoRA; adapter tokens get exactly their slot's."""

import pytest
import torch

pytest.importorskip("vllm")
from vllm.lora.punica_wrapper.punica_cpu import PunicaWrapperCPU  # noqa: E402

from kdlora_serve import lora_cpu  # noqa: E402

STOCK_ADD_LORA_LINEAR = PunicaWrapperCPU.add_lora_linear  # captured before any patch in this process


def wrapper_with_slots(slots: list[int]) -> PunicaWrapperCPU:
    wrapper = PunicaWrapperCPU(max_num_batched_tokens=64, max_batches=8, device="cpu")
    wrapper._token_lora_indices[: len(slots)] = torch.tensor(slots)
    wrapper.indices_len = [len(slots)] * 4
    wrapper.is_prefill, wrapper.no_lora = False, False
    return wrapper


def stacked(slots=2, rank=8, d_in=16, outs=(12, 4)):
    g = torch.Generator().manual_seed(0)
    a = tuple(torch.randn(slots, 1, rank, d_in, generator=g) for _ in outs)
    b = tuple(torch.randn(slots, 1, out, rank, generator=g) for out in outs)
    return a, b


def test_grouped_path_skips_base_tokens_and_applies_each_slot():
    slots = [-1, 0, 1, -1, 0]
    x = torch.randn(len(slots), 16)
    y = torch.randn(len(slots), 16)
    a, b = stacked()
    expected = y.clone()
    for row, slot in enumerate(slots):
        if slot >= 0:
            expected[row, :12] += (x[row] @ a[0][slot, 0].T * 0.5) @ b[0][slot, 0].T
            expected[row, 12:] += (x[row] @ a[1][slot, 0].T * 0.5) @ b[1][slot, 0].T
    lora_cpu.grouped_add_lora_linear(wrapper_with_slots(slots), y, x, a, b, 0.5, (12, 4))
    torch.testing.assert_close(y, expected)


def test_stock_vllm_path_still_has_the_bug():
    """If this fails, vLLM fixed slot -1 on CPU: drop the patch for that version (kdlora_serve/lora_cpu.py)."""
    slots = [-1, 0, 1]
    x, y = torch.randn(3, 16), torch.zeros(3, 16)
    a, b = stacked()
    STOCK_ADD_LORA_LINEAR(wrapper_with_slots(slots), y, x, a, b, 1.0, (12, 4))
    assert y[0].abs().sum() > 0  # the base token received the LAST slot's LoRA


def test_install_is_version_guarded(monkeypatch):
    import vllm

    monkeypatch.setattr(PunicaWrapperCPU, "add_lora_linear", STOCK_ADD_LORA_LINEAR)
    monkeypatch.setattr(PunicaWrapperCPU, "add_lora_logits", PunicaWrapperCPU.add_lora_logits)
    monkeypatch.setattr(vllm, "__version__", "0.99.0")
    assert lora_cpu.install() is False and PunicaWrapperCPU.add_lora_linear is STOCK_ADD_LORA_LINEAR
    monkeypatch.setattr(vllm, "__version__", "0.32.0")
    monkeypatch.setenv("KDLORA_RANK_AWARE", "0")
    assert lora_cpu.install() is False
    monkeypatch.delenv("KDLORA_RANK_AWARE")
    assert lora_cpu.install() is True and PunicaWrapperCPU.add_lora_linear is lora_cpu.grouped_add_lora_linear
