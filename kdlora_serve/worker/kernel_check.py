"""Engine-start self-check of kdlora's CUDA LoRA kernels against vLLM's stock ones, and the fallback's decision.

A user's first `kdlora serve` on a GPU may be the first time kdlora's Triton kernels (lora_triton) compile for that
GPU. So before the engine takes requests (vLLM builds its LoRA layers: `RankAwarePunicaGPU.prepare`), every LoRA'd
layer shape of the loaded model, in the model's dtype, runs one mixed batch through kdlora's wrapper and through
vLLM's own `PunicaWrapperGPU`, on the same random weights, at a decode-sized and a prefill-sized token count. The
batch holds base tokens, an adapter at the full rank R, another adapter of rank R/2, and requests for rank 1 and
(rsLoRA) rank R/4 of the first adapter: for vLLM's kernels those two are truncated copies in slots of their own, as
stock vLLM serves ranks. Where the engine captures CUDA graphs, kdlora's call is also captured once and replayed
after its tables are refilled for another batch, as vLLM replays decode graphs.

Any exception, or a result off by more than the dtype's tolerance (`TOLERANCE`, NaN included), fails the check: the
worker logs one line that says what failed and serves with vLLM's stock kernels, each token's rank applied as a mask
between shrink and expand (lora_triton: correct, cost does not follow the rank). The verdict goes to the API server
(kdlora_serve.lora_report). torch.compile is not re-run here: kdlora's kernels are custom ops, opaque to it
(traced whole in tests/triton_interp).
"""

import logging
import time
from dataclasses import dataclass
from types import SimpleNamespace

import torch

from kdlora_serve import lora_report
from kdlora_serve import rank as rank_protocol

log = logging.getLogger("vllm.kdlora")
TOLERANCE = {torch.float32: 1e-4, torch.float16: 1e-2, torch.bfloat16: 4e-2}  # |ours - stock| <= tol * (1 + |stock|)
TOKEN_COUNTS = (8, 96)  # decode-sized (kdlora's split-K shrink) and prefill-sized (several token blocks)
SLOTS = 4  # 0: adapter X at rank R; 1: adapter Y at R/2; 2, 3: X cut to rank 1 and to R/4 (stock vLLM's copies)


@dataclass(frozen=True)
class LayerShape:
    hidden: int  # input features
    widths: tuple[int, ...]  # output slices (q/k/v, gate/up) as vLLM stacks them
    logits: bool = False  # lm_head: called through add_lora_logits on the sampled tokens

    def __str__(self) -> str:
        kind = "lm_head" if self.logits else "linear"
        return f"{kind} {self.hidden}->{'+'.join(map(str, self.widths))}"


def layer_shapes(modules) -> list[LayerShape]:
    """The distinct LoRA'd layer shapes among vLLM's LoRA modules (linear layers and the logits processor)."""
    shapes = []
    for module in modules:
        lora_a, lora_b = getattr(module, "lora_a_stacked", None), getattr(module, "lora_b_stacked", None)
        if isinstance(lora_a, tuple) and getattr(module, "output_slices", None):
            shape = LayerShape(lora_a[0].shape[-1], tuple(module.output_slices))
        elif isinstance(lora_a, torch.Tensor) and isinstance(lora_b, torch.Tensor):
            shape = LayerShape(lora_a.shape[-1], (lora_b.shape[-2],), logits=True)
        else:
            continue
        if shape not in shapes:
            shapes.append(shape)
    return shapes


def decoder_shapes(config, lm_head: bool = False) -> list[LayerShape]:
    """The LoRA'd layer shapes vLLM builds for a Llama-style decoder (transformers config) with an `all-linear`
    adapter: q/k/v, o, gate/up, down; lm_head only if the adapter targets it (PEFT's all-linear does not)."""
    hidden, inter = config.hidden_size, config.intermediate_size
    head_dim = getattr(config, "head_dim", None) or hidden // config.num_attention_heads
    q, kv = config.num_attention_heads * head_dim, config.num_key_value_heads * head_dim
    shapes = [
        LayerShape(hidden, (q, kv, kv)),
        LayerShape(q, (hidden,)),
        LayerShape(hidden, (inter, inter)),
        LayerShape(inter, (hidden,)),
    ]
    return shapes + [LayerShape(hidden, (config.vocab_size,), logits=True)] if lm_head else shapes


def module_dtype(modules) -> torch.dtype | None:
    for module in modules:
        lora_b = getattr(module, "lora_b_stacked", None)
        if lora_b is not None:
            return (lora_b[0] if isinstance(lora_b, tuple) else lora_b).dtype
    return None


def run(shapes, max_rank: int, dtype: torch.dtype, device, graphs: bool) -> str | None:
    """Check every shape; None when kdlora's kernels agree with vLLM's everywhere, else what failed (one line)."""
    config = SimpleNamespace(
        max_loras=SLOTS, max_lora_rank=max_rank, specialize_active_lora=False, fully_sharded_loras=False
    )
    generator = torch.Generator(device="cpu").manual_seed(0)
    for shape in shapes:
        weights = _weights(shape, max_rank, dtype, device, generator)
        for tokens in TOKEN_COUNTS:
            x = torch.randn(tokens, shape.hidden, generator=generator).to(dtype).to(device)
            y0 = torch.randn(tokens, sum(shape.widths), generator=generator).to(dtype).to(device)
            failure = _check(shape, weights, x, y0, config, graphs)
            if failure:
                return f"{shape}, {tokens} tokens, {str(dtype).removeprefix('torch.')}{failure}"
    return None


def _check(shape: LayerShape, weights, x, y0, config, graphs: bool) -> str | None:
    """One layer shape at one token count: kdlora's wrapper (eager, then replayed from a CUDA graph with another
    batch's tables) against vLLM's on the same batches; None, or what differs."""
    from vllm.lora.punica_wrapper.punica_gpu import PunicaWrapperGPU

    from kdlora_serve.worker.lora_triton import RankAwarePunicaGPU

    tokens, device, max_rank = x.shape[0], x.device, config.max_lora_rank
    batches = [_kinds(tokens, shift) for shift in (0, 1)]  # the second: what a replayed graph is refilled with

    def call(wrapper, y):
        y.copy_(y0)
        _apply(wrapper, shape, y, x, weights)
        return y

    try:
        ours = RankAwarePunicaGPU(tokens, tokens, device, lora_config=config)
        for slot, slot_rank in enumerate(_ranks(max_rank)[:2]):
            ours.slots_changed(slot, slot_rank)
        _map(ours, batches[0], max_rank)
        results = [call(ours, torch.empty_like(y0))]
        if graphs:
            static = torch.empty_like(y0)
            results.append(_replayed(lambda: call(ours, static), lambda: _map(ours, batches[1], max_rank)))
    except Exception as error:  # a compile error, a launch failure, anything: vLLM's kernels serve instead
        return f": kdlora's kernels raised {type(error).__name__}: {(str(error).splitlines() or [''])[0][:200]}"
    for replayed, (kinds, result) in enumerate(zip(batches, results)):
        stock = PunicaWrapperGPU(tokens, tokens, device, lora_config=config)
        _map(stock, kinds, max_rank, stock=True)
        failure = _compare(result, call(stock, torch.empty_like(y0)), y0.dtype)
        if failure:
            where = " (CUDA graph replayed after the tables changed)" if replayed else ""
            return f"{where}: kdlora's kernels differ from vLLM's stock kernels: {failure}"
    return None


def _replayed(call, refill) -> torch.Tensor:
    """`call` captured in a CUDA graph, the wrapper's tables refilled for another batch, the graph replayed: what
    vLLM does at every decode step. Only a GPU runs this (tests/triton_interp checks the launches it relies on)."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # warm-up outside the capture: Triton compiles and autotunes here
        call()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = call()
    refill()
    graph.replay()
    torch.cuda.synchronize()
    return out


def _ranks(max_rank: int) -> tuple[int, int, int, int]:
    """(X's rank, Y's rank, the low rank asked of X, the rsLoRA rank asked of X)."""
    return max_rank, max(1, max_rank // 2), 1, max(1, max_rank // 4)


def _weights(shape: LayerShape, max_rank: int, dtype, device, generator) -> tuple:
    """Stacked (A, B) per slice as vLLM holds them, zero past each slot's rank; slots 2 and 3 are X cut to rank 1 and
    R/4, B scaled by the rank's scale over the slot's (alpha/k over alpha/R; rsLoRA: square roots)."""
    x_rank, y_rank, low, rs = _ranks(max_rank)
    lora_a, lora_b = [], []
    for width in shape.widths:
        a = torch.zeros(SLOTS, 1, max_rank, shape.hidden)
        b = torch.zeros(SLOTS, 1, width, max_rank)
        for slot, slot_rank in ((0, x_rank), (1, y_rank)):
            a[slot, 0, :slot_rank] = torch.randn(slot_rank, shape.hidden, generator=generator) / shape.hidden**0.5
            b[slot, 0, :, :slot_rank] = torch.randn(width, slot_rank, generator=generator) / max_rank**0.5
        for slot, (rank, rslora) in ((2, (low, False)), (3, (rs, True))):
            ratio = rank_protocol.scale_ratio(torch.tensor([rank_protocol.want(rank, rslora)]), max_rank).item()
            a[slot, 0, :rank] = a[0, 0, :rank]
            b[slot, 0, :, :rank] = b[0, 0, :, :rank] * ratio
        lora_a.append(a.to(dtype).to(device))
        lora_b.append(b.to(dtype).to(device))
    if shape.logits:
        return lora_a[0], lora_b[0]
    return tuple(lora_a), tuple(lora_b)


def _kinds(tokens: int, shift: int) -> list[int]:
    """Each token's kind: 0 base, 1 X at R, 2 Y, 3 X at rank 1, 4 X at rank R/4 (rsLoRA), cycled from `shift`."""
    return [(token + shift) % 5 for token in range(tokens)]


def _map(wrapper, kinds: list[int], max_rank: int, stock: bool = False) -> None:
    """Map the batch as vLLM would: stock vLLM sends ranks 1 and R/4 to their copies (slots 2, 3); kdlora sends them to
    X's slot with the rank in the mapping (as lora_slots.set_active_loras writes it). LoRA id = slot + 1."""
    from vllm.lora.layers import LoRAMapping

    _, _, low, rs = _ranks(max_rank)
    if stock:
        ids = {0: 0, 1: 1, 2: 2, 3: 3, 4: 4}
    else:
        ids = {
            0: 0,
            1: 1,
            2: 2,
            3: rank_protocol.pack(1, rank_protocol.want(low, False)),
            4: rank_protocol.pack(1, rank_protocol.want(rs, True)),
        }
    mapping = tuple(ids[kind] for kind in kinds)
    wrapper.update_metadata(LoRAMapping(mapping, mapping, is_prefill=len(kinds) > 8), [1, 2, 3, 4], SLOTS, 0)


def _apply(wrapper, shape: LayerShape, y, x, weights) -> None:
    """The call vLLM's layer of that kind makes (all linear layers go through add_lora_linear = shrink + expand)."""
    lora_a, lora_b = weights
    if shape.logits:
        wrapper.add_lora_logits(y, x, lora_a, lora_b, 1.0)
    else:
        wrapper.add_lora_linear(y, x, lora_a, lora_b, 1.0, shape.widths)


def _compare(ours: torch.Tensor, stock: torch.Tensor, dtype) -> str | None:
    tolerance = TOLERANCE.get(dtype, 4e-2)
    error = (ours.float() - stock.float()).abs()
    bad = ~(error <= tolerance * (1 + stock.float().abs()))  # NaN is bad
    if not bad.any():
        return None
    token, column = (int(i) for i in bad.nonzero()[0])
    return (
        f"{int(bad.sum())} values off, first at token {token} column {column} ({ours[token, column].item():.4g} vs "
        f"{stock[token, column].item():.4g}; tolerance {tolerance} x (1 + |stock|))"
    )


_verdicts: dict[tuple, str | None] = {}  # per process: the check runs once, however many wrappers vLLM builds


def verdict(modules, lora_config, device) -> str | None:
    """At engine start: check kdlora's kernels on this model's LoRA'd layer shapes (module docstring), log the
    outcome in one line, report it to the API server; None when they serve, else why vLLM's stock kernels do."""
    shapes, dtype = layer_shapes(modules), module_dtype(modules)
    graphs = torch.device(device).type == "cuda" and _captures_graphs()
    key = (tuple(shapes), dtype, lora_config.max_lora_rank, str(device), graphs)
    if key in _verdicts:
        return _verdicts[key]
    started = time.perf_counter()
    failure = run(shapes, lora_config.max_lora_rank, dtype, device, graphs) if shapes else None
    seconds = time.perf_counter() - started
    what = (
        f"{len(shapes)} layer shapes, ranks {'/'.join(map(str, sorted(set(_ranks(lora_config.max_lora_rank)))))}, "
        f"{' and '.join(map(str, TOKEN_COUNTS))} tokens, {str(dtype).removeprefix('torch.')}"
        + (", CUDA graph replay" if graphs else "")
    )
    if failure:
        log.warning(
            "kdlora: LoRA kernel self-check FAILED (%s); this engine serves with vLLM's stock LoRA kernels, each "
            "token's rank applied as a mask: correct, but the cost no longer follows the rank",
            failure,
        )
    else:
        log.info("kdlora: LoRA kernel self-check passed (%s) in %.1f s", what, seconds)
    kernels = lora_report.STOCK_MASKED if failure else lora_report.KDLORA_TRITON
    lora_report.write({"kernels": kernels, "checked": what, "failure": failure, "seconds": round(seconds, 2)})
    _verdicts[key] = failure
    return failure


def _captures_graphs() -> bool:
    """Whether this engine will capture CUDA graphs (vLLM's compilation config; assume so when it cannot be read)."""
    from vllm.config import CUDAGraphMode, get_current_vllm_config_or_none

    config = get_current_vllm_config_or_none()
    if config is None or config.model_config is None:
        return True
    return not config.model_config.enforce_eager and config.compilation_config.cudagraph_mode != CUDAGraphMode.NONE
