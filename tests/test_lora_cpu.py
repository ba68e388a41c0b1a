"""The grouped CPU LoRA path: base tokens (slot -1) get no LoRA; adapter tokens get exactly their slot's."""

from types import SimpleNamespace

import pytest
import torch

pytest.importorskip("vllm")
from vllm.lora.punica_wrapper.punica_cpu import PunicaWrapperCPU  # noqa: E402

from kdlora_serve import rank as rank_protocol  # noqa: E402
from kdlora_serve.worker import lora_cpu, lora_slots  # noqa: E402

STOCK_ADD_LORA_LINEAR = PunicaWrapperCPU.add_lora_linear  # kdlora subclasses vLLM's wrapper, never changes it


def wrapper_with_slots(slots: list[int], wrapper_class=lora_cpu.RankAwarePunicaCPU) -> PunicaWrapperCPU:
    wrapper = wrapper_class(max_num_batched_tokens=64, max_batches=8, device="cpu")
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
    wrapper_with_slots(slots).add_lora_linear(y, x, a, b, 0.5, (12, 4))
    torch.testing.assert_close(y, expected)


def test_only_the_slots_true_rank_is_used():
    """A slot holding a rank-3 adapter: rows 3.. of its padded A/B are never read (zero them or not)."""
    slots = [0, 0, -1]
    x, a, b = torch.randn(3, 16), *stacked()
    wrapper = wrapper_with_slots(slots)
    wrapper.slot_ranks = {0: 3}
    y = torch.zeros(3, 16)
    wrapper.add_lora_linear(y, x, a, b, 1.0, (12, 4))
    padded = tuple(t.clone() for t in a), tuple(t.clone() for t in b)
    for t in padded[0]:
        t[:, :, 3:] = 0  # what vLLM stores for a rank-3 adapter: zero padding beyond its rank
    y_padded = torch.zeros(3, 16)
    STOCK_ADD_LORA_LINEAR(wrapper_with_slots([0, 0, 0], PunicaWrapperCPU), y_padded, x, *padded, 1.0, (12, 4))
    torch.testing.assert_close(y[:2], y_padded[:2], rtol=1e-5, atol=1e-5)
    assert y[2].abs().sum() == 0


def test_stock_vllm_path_still_has_the_bug():
    """If this fails, vLLM fixed slot -1 on CPU: kdlora's wrapper is no longer needed for that (worker/lora_cpu.py)."""
    slots = [-1, 0, 1]
    x, y = torch.randn(3, 16), torch.zeros(3, 16)
    a, b = stacked()
    STOCK_ADD_LORA_LINEAR(wrapper_with_slots(slots, PunicaWrapperCPU), y, x, a, b, 1.0, (12, 4))
    assert y[0].abs().sum() > 0  # the base token received the LAST slot's LoRA


def test_slot_weights_are_cached_until_an_adapter_is_activated():
    slots = [0]
    x, (a, b) = torch.randn(1, 16), stacked()
    wrapper = wrapper_with_slots(slots)
    first = torch.zeros(1, 16)
    wrapper.add_lora_linear(first, x, a, b, 1.0, (12, 4))
    for t in a:
        t[0] *= 2  # vLLM writes another adapter into slot 0 ...
    wrapper.slots_changed(1, 8)  # another slot's activation keeps slot 0's layout (a stale one: still 1x)
    kept = torch.zeros(1, 16)
    wrapper.add_lora_linear(kept, x, a, b, 1.0, (12, 4))
    torch.testing.assert_close(kept, first)
    wrapper.slots_changed(0, 8)  # ... and activate_adapter says so
    second = torch.zeros(1, 16)
    wrapper.add_lora_linear(second, x, a, b, 1.0, (12, 4))
    torch.testing.assert_close(second, 2 * first)


def adapter_stacks(rank=8, d_in=16, outs=(12, 4), alpha=8.0, rslora=False):
    """(A, B as vLLM stores them, raw B): slot 0 a rank-`rank` adapter, B times its scale alpha/rank (alpha/sqrt(rank) with
    rsLoRA); slot 1 an unrelated adapter with the same A (a frozen-A LoRA from the same seed)."""
    g = torch.Generator().manual_seed(1)
    a = tuple(torch.zeros(2, 1, rank, d_in) for _ in outs)
    b = tuple(torch.zeros(2, 1, out, rank) for out in outs)
    raw = []
    for a_i, b_i, out in zip(a, b, outs):
        lora_a, lora_b = torch.randn(rank, d_in, generator=g), torch.randn(out, rank, generator=g)
        a_i[0, 0], b_i[0, 0] = lora_a, lora_b * alpha / (rank**0.5 if rslora else rank)
        a_i[1, 0], b_i[1, 0] = lora_a, torch.randn(out, rank, generator=g)
        raw.append(lora_b)
    return a, b, raw


PLANS = [
    ("torch-fused", torch.float32),
    ("torch-split", torch.float32),
    ("torch-fused", torch.bfloat16),
    ("torch-split", torch.bfloat16),
    ("fp32", torch.bfloat16),
]


@pytest.mark.parametrize("plan, dtype", PLANS)  # every plan the start-up measurement may pick, forced
@pytest.mark.parametrize("rslora", [False, True])
@pytest.mark.parametrize(
    "tokens",
    [
        [(0, 3), (0, 8), (-1, 0), (1, 0), (0, 3), (0, 0)],  # scattered rows, rank 0 = the slot's
        [(0, 3), (0, 5), (0, 3), (0, 1)],  # every row, the largest asked for below the slot's
        [(0, 2), (0, 2)],
    ],
)  # one rank, not the slot's
def test_every_rank_of_a_resident_adapter_equals_that_rank_alone(tokens, rslora, plan, dtype, monkeypatch):
    """Tokens asking for different ranks of the adapter in slot 0 (lora_slots' encoding in vLLM's mapping, through
    update_metadata) == each token with the adapter truncated to its rank: A[:k], B[:, :k] scaled by alpha/k."""
    from vllm.lora.layers import LoRAMapping

    monkeypatch.setattr(lora_cpu, "_plan", lambda *args: plan)
    alpha, a, b, raw = 8.0, *adapter_stacks(rslora=rslora)
    x, y = torch.randn(len(tokens), 16), torch.randn(len(tokens), 16)
    expected = y.clone()
    for row, (slot, rank) in enumerate(tokens):
        if slot == 0:
            k = rank or 8
            scale = alpha / (k**0.5 if rslora else k)
            expected[row, :12] += (x[row] @ a[0][0, 0, :k].T * 0.5) @ (raw[0][:, :k] * scale).T
            expected[row, 12:] += (x[row] @ a[1][0, 0, :k].T * 0.5) @ (raw[1][:, :k] * scale).T
        elif slot == 1:
            expected[row, :12] += (x[row] @ a[0][1, 0].T * 0.5) @ b[0][1, 0].T
            expected[row, 12:] += (x[row] @ a[1][1, 0].T * 0.5) @ b[1][1, 0].T
    wrapper = wrapper_with_slots([slot for slot, _ in tokens])
    for slot in (0, 1):
        wrapper.slots_changed(slot, 8)
    ids = tuple(0 if s < 0 else rank_protocol.pack(s + 1, rank_protocol.want(k or None, rslora)) for s, k in tokens)
    wrapper.update_metadata(LoRAMapping(ids, ids, is_prefill=False), [1, 2, None, None], 4, 256)
    assert [slot for slot, *_ in wrapper.token_groups] == sorted(
        {slot for slot, _ in tokens if slot >= 0}
    )  # one group per slot
    a, b, y = tuple(t.to(dtype) for t in a), tuple(t.to(dtype) for t in b), y.to(dtype)
    wrapper.add_lora_linear(y, x.to(dtype), a, b, 0.5, (12, 4))
    tolerance = 1e-5 if dtype == torch.float32 else 0.05 * float(expected.abs().max())
    torch.testing.assert_close(y.float(), expected, rtol=1e-5 if dtype == torch.float32 else 0.02, atol=tolerance)


def test_a_rank_never_asked_for_reads_a_prefix_of_the_slots_layout_and_builds_nothing(monkeypatch):
    from vllm.lora.layers import LoRAMapping

    a, b, _ = adapter_stacks()
    wrapper = wrapper_with_slots([0, 0])
    wrapper.slots_changed(0, 8)
    built = []
    for k in (8, 3, 5):
        ids = (rank_protocol.pack(1, rank_protocol.want(k, False)),) * 2
        wrapper.update_metadata(LoRAMapping(ids, ids, is_prefill=False), [1, None, None, None], 4, 256)
        wrapper.add_lora_linear(torch.zeros(2, 16), torch.randn(2, 16), a, b, 0.5, (12, 4))
        built.append(len(wrapper.layouts))
    assert (
        built[0] >= 1 and built == built[:1] * 3
    )  # the slot's layouts (one per plan the shape uses); ranks 3, 5 add none


def test_the_start_up_measurement_picks_a_fitting_plan_for_every_rank_and_token_count(monkeypatch):
    """What `prepare` runs when vLLM builds its LoRA layers: every measured (rank, tokens) gets a plan that fits the
    shape (fp32 only where the output dtype is not fp32; no fused expand where a slice's B is narrower than its output)."""
    monkeypatch.setattr(lora_cpu, "_PLANS", {})
    monkeypatch.setattr(lora_cpu, "LAYERS", 2)
    layer = SimpleNamespace(
        lora_a_stacked=tuple(torch.zeros(2, 1, 8, 16, dtype=torch.bfloat16) for _ in range(2)),
        lora_b_stacked=tuple(torch.zeros(2, 1, 8, 8, dtype=torch.bfloat16) for _ in range(2)),
        output_slices=(8, 8),
    )
    narrow = SimpleNamespace(
        lora_a_stacked=(torch.zeros(2, 1, 8, 16),), lora_b_stacked=(torch.zeros(2, 1, 6, 8),), output_slices=(8,)
    )
    lora_cpu.measure_plans([layer, narrow, SimpleNamespace()])
    plans = {key[0]: set(chosen.values()) for key, chosen in lora_cpu._PLANS.items()}
    assert plans[torch.bfloat16] <= {"torch-split", "torch-fused", "fp32"} and plans[torch.float32] == {"torch-split"}
    assert all(
        len(chosen) == len(lora_cpu.MEASURED_RANKS) * len(lora_cpu.MEASURED_TOKENS)
        for chosen in lora_cpu._PLANS.values()
    )


def test_a_requests_rank_and_scaling_rule_come_from_its_lora_name_and_config(tmp_path):
    from vllm.lora.request import LoRARequest

    (tmp_path / "plain").mkdir()
    (tmp_path / "plain" / "adapter_config.json").write_text('{"r": 16, "lora_alpha": 16}')
    (tmp_path / "rs").mkdir()
    (tmp_path / "rs" / "adapter_config.json").write_text('{"r": 16, "lora_alpha": 16, "use_rslora": true}')
    assert lora_slots.want_of(LoRARequest("org/a@r4", 1, str(tmp_path / "plain"))) == 8
    assert lora_slots.want_of(LoRARequest("org/a@r4", 1, str(tmp_path / "rs"))) == 9
    assert (
        lora_slots.want_of(LoRARequest("org/a", 1, str(tmp_path / "plain"))) == 0
    )  # a LoRA not named by rank: all of it
    assert lora_slots.want_of(None) == 0
    torch.testing.assert_close(
        rank_protocol.scale_ratio(torch.tensor([0, 8, 9, 32]), 16), torch.tensor([1.0, 4.0, 2.0, 1.0])
    )
