"""The grouped CPU LoRA path: base tokens (slot -1) get no LoRA; adapter tokens get exactly their slot's."""

import pytest
import torch

pytest.importorskip("vllm")
from vllm.lora.punica_wrapper.punica_cpu import PunicaWrapperCPU  # noqa: E402

from kdlora_serve import lora_cpu, lora_slots  # noqa: E402

STOCK_ADD_LORA_LINEAR = PunicaWrapperCPU.add_lora_linear  # captured before any patch in this process
STOCK = {name: getattr(PunicaWrapperCPU, name) for name in ("add_lora_linear", "add_lora_logits", "update_metadata")}


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


@pytest.mark.parametrize("rank", [8, 32])  # one block-diagonal expand for all slices / one expand per slice
def test_grouped_path_skips_base_tokens_and_applies_each_slot(rank):
    slots = [-1, 0, 1, -1, 0]  # slot 0's rows are not contiguous, slot 1's are
    x = torch.randn(len(slots), 16)
    y = torch.randn(len(slots), 16)
    a, b = stacked(rank=rank)
    expected = y.clone()
    for row, slot in enumerate(slots):
        if slot >= 0:
            expected[row, :12] += (x[row] @ a[0][slot, 0].T * 0.5) @ b[0][slot, 0].T
            expected[row, 12:] += (x[row] @ a[1][slot, 0].T * 0.5) @ b[1][slot, 0].T
    lora_cpu.add_lora_linear(wrapper_with_slots(slots), y, x, a, b, 0.5, (12, 4))
    torch.testing.assert_close(y, expected)


def test_only_the_slots_true_rank_is_used():
    """A slot holding a rank-3 adapter: rows 3.. of its padded A/B are never read (zero them or not)."""
    slots = [0, 0, -1]
    x, a, b = torch.randn(3, 16), *stacked()
    wrapper = wrapper_with_slots(slots)
    wrapper.kdlora_slot_ranks = {0: 3}
    y = torch.zeros(3, 16)
    lora_cpu.add_lora_linear(wrapper, y, x, a, b, 1.0, (12, 4))
    padded = tuple(t.clone() for t in a), tuple(t.clone() for t in b)
    for t in padded[0]:
        t[:, :, 3:] = 0  # what vLLM stores for a rank-3 adapter: zero padding beyond its rank
    y_padded = torch.zeros(3, 16)
    STOCK_ADD_LORA_LINEAR(wrapper_with_slots([0, 0, 0]), y_padded, x, *padded, 1.0, (12, 4))
    torch.testing.assert_close(y[:2], y_padded[:2], rtol=1e-5, atol=1e-5)
    assert y[2].abs().sum() == 0


def test_stock_vllm_path_still_has_the_bug():
    """If this fails, vLLM fixed slot -1 on CPU: drop the patch for that version (kdlora_serve/lora_cpu.py)."""
    slots = [-1, 0, 1]
    x, y = torch.randn(3, 16), torch.zeros(3, 16)
    a, b = stacked()
    STOCK_ADD_LORA_LINEAR(wrapper_with_slots(slots), y, x, a, b, 1.0, (12, 4))
    assert y[0].abs().sum() > 0  # the base token received the LAST slot's LoRA


def test_install_is_version_guarded(monkeypatch):
    import vllm

    from vllm.lora.model_manager import LoRAModelManager

    for name, method in STOCK.items():
        monkeypatch.setattr(PunicaWrapperCPU, name, method)
    monkeypatch.setattr(LoRAModelManager, "activate_adapter", LoRAModelManager.activate_adapter)
    monkeypatch.setattr(vllm, "__version__", "0.99.0")
    assert lora_cpu.install() is False and PunicaWrapperCPU.add_lora_linear is STOCK_ADD_LORA_LINEAR
    monkeypatch.setattr(vllm, "__version__", "0.32.0")
    monkeypatch.setenv("KDLORA_RANK_AWARE", "0")
    assert lora_cpu.install() is False
    monkeypatch.delenv("KDLORA_RANK_AWARE")
    assert lora_cpu.install() is True and PunicaWrapperCPU.add_lora_linear is lora_cpu.add_lora_linear
    assert lora_cpu.install() is True and lora_cpu._STOCK["add_lora_linear"] is STOCK_ADD_LORA_LINEAR  # idempotent


def test_slot_weights_are_cached_until_an_adapter_is_activated():
    slots = [0]
    x, (a, b) = torch.randn(1, 16), stacked()
    wrapper = wrapper_with_slots(slots)
    first = torch.zeros(1, 16)
    lora_cpu.add_lora_linear(wrapper, first, x, a, b, 1.0, (12, 4))
    for t in a:
        t[0] *= 2  # vLLM writes another adapter into slot 0 ...
    lora_cpu.slot_changed(wrapper, 0, 8, {0: (0, 1.0)})  # ... and activate_adapter says so
    second = torch.zeros(1, 16)
    lora_cpu.add_lora_linear(wrapper, second, x, a, b, 1.0, (12, 4))
    torch.testing.assert_close(second, 2 * first)


class LoRALayer:  # what the nesting check reads from vLLM's LoRA layers
    def __init__(self, lora_a_stacked, lora_b_stacked):
        self.lora_a_stacked, self.lora_b_stacked = lora_a_stacked, lora_b_stacked


def nested_stacks(rank=8, cut=3, d_in=16, outs=(12, 4), alpha=8.0, dtype=torch.float32):
    """As vLLM stores them: slot 0 a rank-`rank` adapter (B times its scale alpha/rank), slot 1 its cut to `cut`
    (B times alpha/cut), slot 2 an unrelated adapter with the same A (a frozen-A LoRA from the same seed)."""
    g = torch.Generator().manual_seed(1)
    a = tuple(torch.zeros(3, 1, rank, d_in, dtype=dtype) for _ in outs)
    b = tuple(torch.zeros(3, 1, out, rank, dtype=dtype) for out in outs)
    for a_i, b_i, out in zip(a, b, outs):
        lora_a, lora_b = torch.randn(rank, d_in, generator=g), torch.randn(out, rank, generator=g)
        a_i[0, 0], b_i[0, 0] = lora_a, lora_b * alpha / rank
        a_i[1, 0, :cut], b_i[1, 0, :, :cut] = lora_a[:cut], lora_b[:, :cut] * alpha / cut
        a_i[2, 0], b_i[2, 0] = lora_a, torch.randn(out, rank, generator=g)
    return a, b


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cuts_of_one_adapter_are_recognised_and_unrelated_adapters_are_not(dtype):
    a, b = nested_stacks(dtype=dtype)
    nested = lora_slots.nested_slots([LoRALayer(a, b), LoRALayer(a[0], b[0])], {0: 8, 1: 3, 2: 8})  # tuple and logits-style layers
    assert nested[0] == (0, 1.0) and nested[2] == (2, 1.0)
    assert nested[1][0] == 0 and nested[1][1] == pytest.approx(8 / 3, rel=1e-2)


@pytest.mark.parametrize("slots", [[1, 0, -1, 2, 1, 0], [1, 0, 0, 1]])  # scattered rows / every row
def test_a_mixed_rank_batch_is_one_group_per_adapter_and_equals_each_slot_alone(slots):
    ranks = {0: 8, 1: 3, 2: 8}
    a, b = nested_stacks()
    x, y = torch.randn(len(slots), 16), torch.randn(len(slots), 16)
    expected = y.clone()
    for row, slot in enumerate(slots):
        if slot >= 0:  # each slot with its own stored weights at its own rank
            r = ranks[slot]
            expected[row, :12] += (x[row] @ a[0][slot, 0, :r].T * 0.5) @ b[0][slot, 0, :, :r].T
            expected[row, 12:] += (x[row] @ a[1][slot, 0, :r].T * 0.5) @ b[1][slot, 0, :, :r].T
    wrapper = wrapper_with_slots(slots)
    nested = lora_slots.nested_slots([LoRALayer(a, b)], ranks)
    for slot, rank in ranks.items():
        lora_cpu.slot_changed(wrapper, slot, rank, nested)
    wrapper.kdlora_token_groups = lora_cpu._groups(torch.tensor(slots), ranks, nested)
    assert sorted(slot for slot, _, _ in wrapper.kdlora_token_groups) == sorted({0, 2} & set(slots))  # slots 0, 1 together
    lora_cpu.add_lora_linear(wrapper, y, x, a, b, 0.5, (12, 4))
    torch.testing.assert_close(y, expected)
