"""Rank-aware LoRA for vLLM's CUDA path: Triton shrink/expand kernels that follow each slot's true rank.

Stock vLLM pads every adapter slot to `--max-lora-rank` and its Triton kernels read all of it, so a rank-8
adapter costs what a rank-64 one does (vLLM's PR 11267 measured rank 8 at 0.66x of base on an A100). These
kernels keep vLLM's padded tensors (same shapes and addresses every step, so CUDA graphs and torch.compile see
nothing new) and read each token's rank from small device tables filled with vLLM's metadata each step: loads
of A and B are masked to the rank and rank tiles past it do no work, so the bytes read, which decode-time
LoRA is bound by, follow the adapter's rank and not the padding.

Tokens are grouped by slot. Every rank of an adapter is served from its one slot (lora_slots: the rank travels
with the request), so a group reads its slot's weights up to the largest rank its tokens ask for, each token
masked to its own rank and scaled by its rank's alpha/k relative to the slot's alpha/R. Base-model tokens (slot
-1) are in no group.

`RankAwarePunicaGPU`, built by vLLM on CUDA only, for the vLLM versions tested (kdlora_serve.vllm_patches). Verified for
correctness on CPU under Triton's interpreter (tests/triton_interp), never run on a GPU yet: the block sizes are not
tuned. So at engine start the wrapper checks its kernels against vLLM's on the model's layer shapes (kernel_check);
if they fail, that engine serves with vLLM's stock kernels and each token's rank applied as a mask on the shrunk
activations (zero past the rank, times the rank's scale): the same numbers, at the padded cost.
`KDLORA_RANK_AWARE=0` keeps vLLM's stock kernels and each rank its own LoRA.
"""

from dataclasses import dataclass

import torch
from vllm.lora.punica_wrapper.punica_gpu import PunicaWrapperGPU
from vllm.triton_utils import tl, triton  # placeholders where Triton is unusable (vLLM's CPU build)

from kdlora_serve import rank as rank_protocol
from kdlora_serve.worker import kernel_check
from kdlora_serve.worker.lora_slots import RankAwarePunica

BLOCK_M, BLOCK_R, BLOCK_K, BLOCK_N = 16, 16, 64, 64  # tokens, ranks, hidden (shrink), outputs (expand); untuned
SHRINK_SPLIT_K = 8  # decode: programs per token block along the hidden dim, so a step fills more than a few SMs


@triton.jit
def _group_tokens(sorted_tokens_ptr, group_start_ptr, group, count, pid_m, BLOCK_M: tl.constexpr):
    """The token indices of this program's block of a group, and which of them are real."""
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    real = rows < count
    tokens = tl.load(sorted_tokens_ptr + tl.load(group_start_ptr + group) + rows, mask=real, other=0).to(tl.int64)
    return tokens, real


@triton.jit
def _shrink_kernel(
    x_ptr,
    a_ptr,
    out_ptr,
    sorted_tokens_ptr,
    group_count_ptr,
    group_start_ptr,
    group_slot_ptr,
    slot_rank_ptr,
    token_rank_ptr,
    token_scale_ptr,
    hidden,
    scale,
    stride_xt,
    stride_xh,
    stride_as,
    stride_ar,
    stride_ah,
    stride_ot,
    stride_or,
    BLOCK_M: tl.constexpr,
    BLOCK_R: tl.constexpr,
    BLOCK_K: tl.constexpr,
    SPLIT_K: tl.constexpr,
):
    """out[t, :rank(t)] (+)= x[t] @ A[slot][:rank(t)]^T * scale * scale(t) for the tokens t of one group."""
    pid_mk, pid_r, group = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    pid_m, pid_k = pid_mk // SPLIT_K, pid_mk % SPLIT_K
    slot, count = tl.load(group_slot_ptr + group), tl.load(group_count_ptr + group)
    if (slot < 0) | (pid_m * BLOCK_M >= count):  # base-model tokens, or no tokens left for this block
        return
    rank = tl.load(slot_rank_ptr + slot)  # the largest rank this group's tokens ask for
    if pid_r * BLOCK_R >= rank:  # a rank tile past it: nothing to read
        return
    tokens, real = _group_tokens(sorted_tokens_ptr, group_start_ptr, group, count, pid_m, BLOCK_M)
    ranks = pid_r * BLOCK_R + tl.arange(0, BLOCK_R)
    token_rank = tl.load(token_rank_ptr + tokens, mask=real, other=0)
    token_scale = tl.load(token_scale_ptr + tokens, mask=real, other=0.0)
    in_rank = ranks < rank
    ks = tl.arange(0, BLOCK_K)
    a_slot = a_ptr + slot.to(tl.int64) * stride_as
    acc = tl.zeros((BLOCK_M, BLOCK_R), dtype=tl.float32)
    for k in range(pid_k * BLOCK_K, hidden, BLOCK_K * SPLIT_K):
        in_hidden = k + ks < hidden
        x = tl.load(
            x_ptr + tokens[:, None] * stride_xt + (k + ks)[None, :] * stride_xh,
            mask=real[:, None] & in_hidden[None, :],
            other=0.0,
        )
        a = tl.load(
            a_slot + ranks[None, :] * stride_ar + (k + ks)[:, None] * stride_ah,
            mask=in_rank[None, :] & in_hidden[:, None],
            other=0.0,
        )  # masked rows past the rank: never read
        acc += tl.dot(x, a)
    acc = tl.where(ranks[None, :] < token_rank[:, None], acc * (scale * token_scale)[:, None], 0.0)
    out = out_ptr + tokens[:, None] * stride_ot + ranks[None, :] * stride_or
    if SPLIT_K == 1:
        tl.store(out, acc, mask=real[:, None] & in_rank[None, :])
    else:
        tl.atomic_add(out, acc, mask=real[:, None] & in_rank[None, :])


@triton.jit
def _expand_kernel(
    in_ptr,
    b_ptr,
    y_ptr,
    sorted_tokens_ptr,
    group_count_ptr,
    group_start_ptr,
    group_slot_ptr,
    slot_rank_ptr,
    width,
    column_offset,
    stride_it,
    stride_ir,
    stride_bs,
    stride_bn,
    stride_br,
    stride_yt,
    stride_yn,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_R: tl.constexpr,
    ADD_INPUTS: tl.constexpr,
):
    """y[t, offset + n] (+)= shrunk[t, :rank] @ B[slot][n, :rank]^T for the tokens t of one group (the shrink
    already zeroed each token's columns past its own rank)."""
    pid_m, pid_n, group = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    slot, count = tl.load(group_slot_ptr + group), tl.load(group_count_ptr + group)
    if (slot < 0) | (pid_m * BLOCK_M >= count):
        return
    rank = tl.load(slot_rank_ptr + slot)
    tokens, real = _group_tokens(sorted_tokens_ptr, group_start_ptr, group, count, pid_m, BLOCK_M)
    columns = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    in_width = columns < width
    rs = tl.arange(0, BLOCK_R)
    b_slot = b_ptr + slot.to(tl.int64) * stride_bs
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for r in range(0, rank, BLOCK_R):
        in_rank = r + rs < rank
        shrunk = tl.load(
            in_ptr + tokens[:, None] * stride_it + (r + rs)[None, :] * stride_ir,
            mask=real[:, None] & in_rank[None, :],
            other=0.0,
        )
        b = tl.load(
            b_slot + columns[None, :] * stride_bn + (r + rs)[:, None] * stride_br,
            mask=in_rank[:, None] & in_width[None, :],
            other=0.0,
        )
        acc += tl.dot(shrunk.to(b.dtype), b)
    y = y_ptr + tokens[:, None] * stride_yt + (column_offset + columns)[None, :] * stride_yn
    if ADD_INPUTS:
        acc += tl.load(y, mask=real[:, None] & in_width[None, :], other=0.0).to(tl.float32)
    tl.store(y, acc.to(y_ptr.dtype.element_ty), mask=real[:, None] & in_width[None, :])


# Custom ops: torch.compile (vLLM compiles the model on CUDA) calls them as opaque mutations, never tracing the
# host-side checks inside. `groups`: (tokens sorted by group, tokens per group, group starts, each group's slot,
# each slot's rank this step, each token's rank and scale, the no-LoRA flag on the host), as `Batch.groups` packs them.
@torch.library.custom_op("kdlora::lora_shrink", mutates_args=("out",))
def lora_shrink(
    x: torch.Tensor,
    lora_a: list[torch.Tensor],
    out: torch.Tensor,
    groups: list[torch.Tensor],
    scale: float,
    split_k: int,
) -> None:
    """out[i] = the slice-i shrink of every LoRA token, zero elsewhere. out: [slices, tokens, padded rank] fp32."""
    out.zero_()
    sorted_tokens, counts, starts, group_slots, group_rank, token_rank, token_scale, no_lora = groups
    if no_lora.item():
        return
    padded_rank, hidden = lora_a[0].shape[-2], x.shape[-1]
    grid = (triton.cdiv(x.shape[0], BLOCK_M) * split_k, triton.cdiv(padded_rank, BLOCK_R), group_slots.numel())
    for a, out_slice in zip(lora_a, out):
        _shrink_kernel[grid](
            x,
            a,
            out_slice,
            sorted_tokens,
            counts,
            starts,
            group_slots,
            group_rank,
            token_rank,
            token_scale,
            hidden,
            scale,
            x.stride(0),
            x.stride(1),
            a.stride(0),
            a.stride(-2),
            a.stride(-1),
            out_slice.stride(0),
            out_slice.stride(1),
            BLOCK_M=BLOCK_M,
            BLOCK_R=BLOCK_R,
            BLOCK_K=BLOCK_K,
            SPLIT_K=split_k,
        )


@torch.library.custom_op("kdlora::lora_expand", mutates_args=("y",))
def lora_expand(
    shrunk: torch.Tensor,
    lora_b: list[torch.Tensor],
    y: torch.Tensor,
    groups: list[torch.Tensor],
    offset_start: int,
    add_inputs: bool,
) -> None:
    """y[:, offset:offset + width_i] (+)= shrunk[i] @ B_i^T for every LoRA token, slices side by side from offset_start."""
    sorted_tokens, counts, starts, group_slots, group_rank, _, _, no_lora = groups
    if no_lora.item():
        return
    offset = offset_start
    for b, shrunk_slice in zip(lora_b, shrunk):
        width = b.shape[-2]
        grid = (triton.cdiv(shrunk_slice.shape[0], BLOCK_M), triton.cdiv(width, BLOCK_N), group_slots.numel())
        _expand_kernel[grid](
            shrunk_slice,
            b,
            y,
            sorted_tokens,
            counts,
            starts,
            group_slots,
            group_rank,
            width,
            offset,
            shrunk_slice.stride(0),
            shrunk_slice.stride(1),
            b.stride(0),
            b.stride(-2),
            b.stride(-1),
            y.stride(0),
            y.stride(1),
            BLOCK_M=BLOCK_M,
            BLOCK_N=BLOCK_N,
            BLOCK_R=BLOCK_R,
            ADD_INPUTS=add_inputs,
        )
        offset += width


@dataclass
class Batch:
    """One step's token grouping on the wrapper's device, for the layers' tokens or the sampled ones (lm_head):
    vLLM's LoRAKernelMeta (tokens sorted by slot, counts, starts, group slots), each slot's largest rank asked for,
    each token's rank and scale. Filled in place, so captured CUDA graphs stay valid."""

    meta: object
    group_rank: torch.Tensor
    token_rank: torch.Tensor
    token_scale: torch.Tensor

    @classmethod
    def make(cls, max_loras: int, max_tokens: int, device) -> "Batch":
        from vllm.lora.ops.triton_ops import LoRAKernelMeta

        return cls(
            LoRAKernelMeta.make(max_loras, max_tokens, device),
            torch.zeros(max_loras, dtype=torch.int32, device=device),
            torch.zeros(max_tokens, dtype=torch.int32, device=device),
            torch.zeros(max_tokens, dtype=torch.float32, device=device),
        )

    def prepare(self, token_slots: torch.Tensor, wants: torch.Tensor, slot_rank: torch.Tensor) -> None:
        """This step's grouping; `wants` per token (kdlora_serve.rank), `slot_rank` each slot's full rank (host)."""
        slots = token_slots.cpu().long()
        full = slot_rank[slots.clamp(min=0)]
        ranks = torch.where(slots < 0, 0, rank_protocol.token_ranks(wants, full))
        self.group_rank.copy_(
            torch.zeros(len(self.group_rank), dtype=torch.int64).scatter_reduce(0, slots.clamp(min=0), ranks, "amax")
        )
        self.token_rank[: len(slots)].copy_(ranks)
        self.token_scale[: len(slots)].copy_(rank_protocol.scale_ratio(wants, full))
        self.meta.prepare_tensors(token_slots)

    def rank_mask(self, num_tokens: int, padded_rank: int) -> torch.Tensor:
        """[tokens, padded rank] fp32: each token's rank scale up to its rank, zero past it (the stock fallback)."""
        ranks = torch.arange(padded_rank, device=self.token_rank.device)
        return (ranks < self.token_rank[:num_tokens, None]) * self.token_scale[:num_tokens, None]

    def groups(self, num_tokens: int) -> list[torch.Tensor]:
        meta = self.meta
        return [
            meta.token_indices_sorted_by_lora_ids[:num_tokens],
            meta.num_tokens_per_lora,
            meta.lora_token_start_loc,
            meta.active_lora_ids,
            self.group_rank,
            self.token_rank,
            self.token_scale,
            meta.no_lora_flag_cpu,
        ]


@dataclass
class SlotTable:
    """Each slot's full rank (host; reported at activation) and this step's Batch for the layers' tokens and for the
    sampled ones."""

    slot_rank: torch.Tensor
    tokens: Batch
    samples: Batch

    @classmethod
    def make(cls, max_loras: int, max_lora_rank: int, max_tokens: int, device) -> "SlotTable":
        return cls(
            slot_rank=torch.full((max_loras,), max_lora_rank, dtype=torch.int64),
            tokens=Batch.make(max_loras, max_tokens, device),
            samples=Batch.make(max_loras, max_tokens, device),
        )


class RankAwarePunicaGPU(RankAwarePunica, PunicaWrapperGPU):
    """vLLM's GPU punica wrapper with kdlora's kernels (module docstring); vLLM builds it through the platform's
    punica-wrapper choice (kdlora_serve.vllm_patches). With fully sharded LoRAs the rank itself is split over GPUs:
    there every call is vLLM's own."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.table = SlotTable.make(
            self.max_loras, self.lora_config.max_lora_rank, self._token_lora_indices.numel(), self.device
        )
        self.stock_kernels = False  # set at engine start when kdlora's kernels fail their self-check

    def prepare(self, modules) -> None:
        self.stock_kernels = kernel_check.verdict(list(modules), self.lora_config, self.device) is not None

    def slots_changed(self, slot: int, slot_rank: int) -> None:
        super().slots_changed(slot, slot_rank)
        self.table.slot_rank[slot] = slot_rank

    def group(self, token_wants, sample_wants) -> None:
        from vllm.utils.gpu_sync_debug import gpu_sync_allowed

        with gpu_sync_allowed():  # as vLLM's own metadata step: grouping sorts and counts on the host's request
            self.table.tokens.prepare(self.token_lora_indices, token_wants, self.table.slot_rank)
            self.table.samples.prepare(self.sampler_indices, sample_wants, self.table.slot_rank)

    def add_shrink(self, y, x, lora_a_stacked, scale, **kwargs):
        if self.lora_config.fully_sharded_loras:
            return super().add_shrink(y, x, lora_a_stacked, scale, **kwargs)
        x = x.view(-1, x.shape[-1])
        if self.stock_kernels:
            super().add_shrink(y, x, lora_a_stacked, scale)
            y[:, : x.shape[0]].mul_(self.table.tokens.rank_mask(x.shape[0], y.shape[-1]))
            return
        groups = self.table.tokens.groups(x.shape[0])
        lora_shrink(x, list(lora_a_stacked), y, groups, scale, _split_k(x.shape[-1], x.shape[0]))

    def add_expand(self, y, x, lora_b_stacked, output_slices, offset_start=0, add_inputs=True, **kwargs):
        if self.lora_config.fully_sharded_loras or self.stock_kernels:  # stock: the shrink already applied the ranks
            return super().add_expand(y, x, lora_b_stacked, output_slices, offset_start, add_inputs, **kwargs)
        assert x.ndim == 3 and x.size(0) == len(output_slices) == len(lora_b_stacked)
        groups = self.table.tokens.groups(x.shape[1])
        lora_expand(x, list(lora_b_stacked), y.view(-1, y.shape[-1]), groups, offset_start, add_inputs)

    def add_lora_logits(self, y, x, lora_a_stacked, lora_b_stacked, scale, *, buffer=None, **kwargs):
        if self.lora_config.fully_sharded_loras:
            return super().add_lora_logits(y, x, lora_a_stacked, lora_b_stacked, scale, buffer=buffer, **kwargs)
        y, x = y.view(-1, y.shape[-1]), x.view(-1, x.shape[-1])
        shrunk = torch.empty((1, x.shape[0], lora_b_stacked.shape[-1]), dtype=torch.float32, device=x.device)
        if self.stock_kernels:  # vLLM's add_lora_logits with the sampled tokens' ranks applied between its two kernels
            from vllm.lora.ops import triton_ops as stock

            meta = self.prompt_mapping_meta
            specialize = self.lora_config.specialize_active_lora
            stock.lora_shrink(x, [lora_a_stacked], shrunk, *meta.meta_args(x.shape[0], specialize), scale)
            shrunk.mul_(self.table.samples.rank_mask(x.shape[0], shrunk.shape[-1]))
            stock.lora_expand(shrunk, [lora_b_stacked], y, *meta.meta_args(x.shape[0], specialize), add_inputs=True)
            return
        groups = self.table.samples.groups(x.shape[0])
        lora_shrink(x, [lora_a_stacked], shrunk, groups, scale, _split_k(x.shape[-1], x.shape[0]))
        lora_expand(shrunk, [lora_b_stacked], y, groups, 0, True)


def punica_wrapper(platform) -> str:
    """The CUDA platform's punica-wrapper choice, as kdlora installs it (kdlora_serve.vllm_patches)."""
    return f"{__name__}.{RankAwarePunicaGPU.__qualname__}"


def _split_k(hidden: int, tokens: int) -> int:
    """Split the shrink's hidden dim over programs (atomic adds) only for decode-sized batches: prefill has
    enough token blocks to fill the GPU."""
    return 1 if tokens > 4 * BLOCK_M else max(1, min(SHRINK_SPLIT_K, hidden // (4 * BLOCK_K)))
