"""kdlora's Triton LoRA kernels (kdlora_serve/worker/lora_triton.py) == a torch reference == vLLM's stock kernels on the
padded weights, through vLLM's own PunicaWrapperGPU on CPU tensors under Triton's interpreter (fp16: numpy has
no bf16). One mixed batch: base tokens, three adapters at ranks 16 / 8 / 32 (padded to 32), and requests for
rank 4 of the rank-16 adapter (rsLoRA scaling), in the layer shapes vLLM calls: q/k/v slices (GQA widths), gate/up, a row-parallel
down_proj (shrink and expand called apart) and lm_head (sampled tokens)."""

import inspect
import logging
import sys
from types import SimpleNamespace

import pytest
import torch
import vllm
from vllm.lora.layers import LoRAMapping
from vllm.lora.punica_wrapper.punica_gpu import PunicaWrapperGPU
from vllm.platforms import current_platform
from vllm.triton_utils import HAS_TRITON

from kdlora_serve import lora_report, vllm_patches
from kdlora_serve import rank as rank_protocol
from kdlora_serve.worker import kernel_check, lora_triton
from kdlora_serve.worker.lora_slots import RankAwarePunica

pytestmark = pytest.mark.triton_interpreter

HIDDEN, VOCAB, MAX_RANK = 64, 256, 32
SLOT_RANKS = {0: 16, 1: 4, 2: 8, 3: 32}  # slot 1: what stock vLLM loads for rank 4 of slot 0's adapter (its own copy)
TOKEN_SLOTS = [-1, 0, 1, 2, 3, 1, -1, 0, 2, 1]  # -1: base model
RANK_4_OF_SLOT_0 = rank_protocol.pack(1, rank_protocol.want(4, rslora=True))  # slot 0's LoRA id (1) at rank 4
LAYERS = {"qkv": (64, 32, 32), "gate_up": (96, 96), "down": (64,), "lm_head": (VOCAB,)}
CONFIG = SimpleNamespace(max_loras=4, max_lora_rank=MAX_RANK, specialize_active_lora=False, fully_sharded_loras=False)


def adapter_weights(widths: tuple[int, ...], seed: int) -> tuple[tuple, tuple]:
    """Stacked (A per slice [slots, 1, MAX_RANK, HIDDEN], B per slice [slots, 1, width, MAX_RANK]) as vLLM holds them:
    each slot zero past its adapter's rank; slot 1 = slot 0 cut to rank 4, B scaled by 2 (rsLoRA: sqrt(16 / 4))."""
    g = torch.Generator().manual_seed(seed)
    a_all, b_all = [], []
    for width in widths:
        a = torch.zeros(4, 1, MAX_RANK, HIDDEN)
        b = torch.zeros(4, 1, width, MAX_RANK)
        for slot, rank in SLOT_RANKS.items():
            a[slot, 0, :rank] = torch.randn(rank, HIDDEN, generator=g) * 0.2
            b[slot, 0, :, :rank] = torch.randn(width, rank, generator=g) * 0.2
        a[1, 0, :4], b[1, 0, :, :4] = a[0, 0, :4], 2 * b[0, 0, :, :4]
        a_all.append(a.half())
        b_all.append(b.half())
    return tuple(a_all), tuple(b_all)


WEIGHTS = {name: adapter_weights(widths, seed) for seed, (name, widths) in enumerate(LAYERS.items())}
X = torch.randn(len(TOKEN_SLOTS), HIDDEN, generator=torch.Generator().manual_seed(7)).half()
Y0 = {
    name: torch.randn(len(TOKEN_SLOTS), sum(widths), generator=torch.Generator().manual_seed(8)).half()
    for name, widths in LAYERS.items()
}


def reference(name: str, token_slots=TOKEN_SLOTS) -> torch.Tensor:
    """y0 + x @ A_s^T @ B_s^T per token, s its slot, in fp32 on the slot's own (zero-padded) weights."""
    y = Y0[name].float().clone()
    lora_a, lora_b = WEIGHTS[name]
    for token, slot in enumerate(token_slots):
        if slot >= 0:
            y[token] += torch.cat(
                [(X[token].float() @ a[slot, 0].float().t()) @ b[slot, 0].float().t() for a, b in zip(lora_a, lora_b)]
            )
    return y


def wrapper(wrapper_class=PunicaWrapperGPU, config=CONFIG) -> PunicaWrapperGPU:
    """A GPU punica wrapper on CPU tensors with the batch mapped: for stock vLLM rank 4 is slot 1's own copy; for
    kdlora's wrapper it is slot 0's adapter with the rank in the mapping, as lora_slots.set_active_loras writes it."""
    punica = wrapper_class(64, 8, "cpu", lora_config=config)
    if isinstance(punica, RankAwarePunica) and not config.fully_sharded_loras:
        for slot, rank in SLOT_RANKS.items():
            punica.slots_changed(slot, rank)
    map_tokens(punica, TOKEN_SLOTS)
    return punica


def map_tokens(punica: PunicaWrapperGPU, token_slots: list[int]) -> None:
    """vLLM's metadata step for a batch (tokens by slot; kdlora's wrapper gets slot 1's tokens as rank 4 of slot 0,
    except with fully sharded LoRAs, where ranks are served as stock vLLM serves them)."""
    lora_ids = tuple(slot + 1 for slot in token_slots)  # id 0 = no LoRA; slot s holds id s + 1
    if isinstance(punica, RankAwarePunica) and not punica.lora_config.fully_sharded_loras:
        lora_ids = tuple(RANK_4_OF_SLOT_0 if slot == 1 else slot + 1 for slot in token_slots)
    punica.update_metadata(LoRAMapping(lora_ids, lora_ids, is_prefill=False), [1, 2, 3, 4], 4, VOCAB)


def apply(punica: PunicaWrapperGPU, name: str, weights=None) -> torch.Tensor:
    """One layer's LoRA, called as vLLM's layer of that kind calls the wrapper."""
    lora_a, lora_b = weights or WEIGHTS[name]
    y = Y0[name].clone()
    if name == "lm_head":
        punica.add_lora_logits(y, X, lora_a[0][:, 0], lora_b[0][:, 0], 1.0)
    elif name == "down":  # RowParallelLinearWithLoRA: a zeroed buffer, shrink, (all-reduce), expand
        buffer = torch.zeros(1, len(X), MAX_RANK, dtype=torch.float32)
        punica.add_shrink(buffer, X, lora_a, 1.0)
        punica.add_expand(y, buffer, lora_b, LAYERS[name], offset_start=0, add_input=True)
    else:
        punica.add_lora_linear(y, X, lora_a, lora_b, 1.0, LAYERS[name])
    return y


@pytest.fixture(scope="module")
def stock() -> dict[str, torch.Tensor]:
    """vLLM's own Triton kernels (module scope: computed before any test installs kdlora's)."""
    assert HAS_TRITON, "the interpreter set-up in conftest.py did not make vLLM's Triton kernels importable"
    return {name: apply(wrapper(), name) for name in LAYERS}


@pytest.fixture
def kdlora() -> type:
    """kdlora's wrapper class, as vLLM builds it on CUDA once kdlora_serve.vllm_patches is installed."""
    return lora_triton.RankAwarePunicaGPU


def assert_close(actual: torch.Tensor, expected: torch.Tensor) -> None:
    torch.testing.assert_close(actual.float(), expected.float(), atol=3e-3, rtol=1e-2)


@pytest.mark.parametrize("name", LAYERS)
def test_kdlora_kernels_equal_the_reference_and_vllms_stock_kernels(stock, kdlora, name):
    ours = apply(wrapper(kdlora), name)
    assert_close(ours, reference(name))
    assert_close(stock[name], reference(name))
    base_rows = [token for token, slot in enumerate(TOKEN_SLOTS) if slot < 0]
    assert torch.equal(ours[base_rows], Y0[name][base_rows])  # base-model tokens untouched, bit for bit


def test_a_rank_of_a_resident_adapter_reads_its_slot_not_a_copy(kdlora):
    """Slot 1's copy zeroed: the rank-4 tokens still get rank 4 of slot 0's adapter, scaled to their rank."""
    punica = wrapper(kdlora)
    lora_a, lora_b = (tuple(t.clone() for t in group) for group in WEIGHTS["qkv"])
    for t in lora_a + lora_b:
        t[1].zero_()
    assert_close(apply(punica, "qkv", (lora_a, lora_b)), reference("qkv"))
    assert punica.table.tokens.meta.active_lora_ids.tolist()[:4] == [
        -1,
        0,
        2,
        3,
    ]  # three groups read weights, not four


@pytest.mark.parametrize("slot, wrong_rank", [(1, 16), (3, 31), (0, 8)])
def test_a_wrong_rank_mask_fails_the_comparison(kdlora, slot, wrong_rank):
    """Mutation check: the comparison above catches a rank mask off in either direction: a rank-4 token reading past
    its rank into the rest of its adapter, or a token cut short. (A mask past the rank of a slot's OWN weights reads
    vLLM's zero padding: same numbers, more bytes; only a benchmark sees that.)"""
    punica = wrapper(kdlora)
    rows = [token for token, s in enumerate(TOKEN_SLOTS) if s == slot]
    punica.table.tokens.token_rank[rows] = wrong_rank
    ours = apply(punica, "qkv")
    assert (ours[rows].float() - reference("qkv")[rows]).abs().max() > 0.05


def test_fully_sharded_loras_keep_vllms_kernels(stock, kdlora, monkeypatch):
    """With the rank itself split over GPUs (fully_sharded_loras), kdlora's rank table does not apply: vLLM's path."""
    sharded = wrapper(kdlora, SimpleNamespace(**{**vars(CONFIG), "fully_sharded_loras": True}))
    monkeypatch.setattr(
        lora_triton, "lora_shrink", lambda *args: pytest.fail("kdlora's kernel ran on fully sharded LoRAs")
    )
    for name in ("down", "lm_head"):
        assert torch.equal(apply(sharded, name), stock[name])


def test_split_k_accumulates_the_same(kdlora, monkeypatch):
    """The shrink split over the hidden dim (atomic adds), as on a GPU with a large hidden size."""
    monkeypatch.setattr(lora_triton, "BLOCK_K", 16)
    monkeypatch.setattr(lora_triton, "_split_k", lambda hidden, tokens: 2)
    assert_close(apply(wrapper(kdlora), "gate_up"), reference("gate_up"))


def test_traces_whole_under_torch_compile(kdlora):
    """vLLM compiles the model on CUDA with full graphs: the LoRA calls must trace without a graph break (the kernels
    are custom ops; the host-side checks run inside them)."""
    punica = wrapper(kdlora)
    lora_a, lora_b = WEIGHTS["qkv"]

    def layer(y, x):
        punica.add_lora_linear(y, x, lora_a, lora_b, 1.0, LAYERS["qkv"])
        return y

    assert_close(torch.compile(layer, backend="eager", fullgraph=True)(Y0["qkv"].clone(), X), reference("qkv"))


def test_vllm_signatures_are_the_ones_kdlora_was_written_against():
    """If this fails, vLLM changed what kdlora patches or compares with: check lora_triton against the new code
    before adding the version to TESTED_VLLM_VERSIONS."""
    from vllm.lora.ops.triton_ops.lora_expand_op import _lora_expand
    from vllm.lora.ops.triton_ops.lora_shrink_op import _lora_shrink

    signatures = {
        f.__qualname__: str(inspect.signature(f))
        for f in (
            PunicaWrapperGPU.update_metadata,
            PunicaWrapperGPU.add_shrink,
            PunicaWrapperGPU.add_expand,
            PunicaWrapperGPU.add_lora_linear,
            PunicaWrapperGPU.add_lora_logits,
            _lora_shrink,
            _lora_expand,
        )
    }
    assert signatures == RECORDED_SIGNATURES


RECORDED_SIGNATURES = {  # vLLM 0.32.0
    "PunicaWrapperGPU.add_expand": "(self, y: torch.Tensor, x: torch.Tensor, lora_b_stacked: tuple[torch.Tensor, ...], output_slices: tuple[int, ...], offset_start: int = 0, add_inputs=True, **kwargs: Any) -> None",
    "PunicaWrapperGPU.add_lora_linear": "(self, y: torch.Tensor, x: torch.Tensor, lora_a_stacked: tuple[torch.Tensor, ...], lora_b_stacked: tuple[torch.Tensor, ...], scale: float, output_slices: tuple[int, ...], *, buffer: torch.Tensor | None = None, **kwargs: Any) -> None",
    "PunicaWrapperGPU.add_lora_logits": "(self, y: torch.Tensor, x: torch.Tensor, lora_a_stacked: torch.Tensor, lora_b_stacked: torch.Tensor, scale, *, buffer: torch.Tensor | None = None, **kwargs: Any) -> None",
    "PunicaWrapperGPU.add_shrink": "(self, y: torch.Tensor, x: torch.Tensor, lora_a_stacked: tuple[torch.Tensor, ...], scale: float, **kwargs: Any)",
    "PunicaWrapperGPU.update_metadata": "(self, mapping: vllm.lora.layers.utils.LoRAMapping, lora_index_to_id: list[int | None], max_loras: int, vocab_size: int, **kwargs)",
    "_lora_expand": "(inputs: torch.Tensor, lora_b_weights: list[torch.Tensor], output_tensor: torch.Tensor, token_lora_mapping: torch.Tensor, token_indices_sorted_by_lora_ids: torch.Tensor, num_tokens_per_lora: torch.Tensor, lora_token_start_loc: torch.Tensor, lora_ids: torch.Tensor, no_lora_flag_cpu: torch.Tensor, num_active_loras: torch.Tensor, offset_start: int = 0, add_inputs: bool = False) -> None",
    "_lora_shrink": "(inputs: torch.Tensor, lora_a_weights: list[torch.Tensor], output_tensor: torch.Tensor, token_lora_mapping: torch.Tensor, token_indices_sorted_by_lora_ids: torch.Tensor, num_tokens_per_lora: torch.Tensor, lora_token_start_loc: torch.Tensor, lora_ids: torch.Tensor, no_lora_flag_cpu: torch.Tensor, num_active_loras: torch.Tensor, scaling: float) -> None",
}


def test_install_is_version_guarded(monkeypatch):
    """On CUDA, vllm_patches hands vLLM kdlora's wrapper through the platform's choice, only for tested versions and
    unless switched off; uninstall gives vLLM its own choice back."""

    class CudaPlatformBase:  # vllm.platforms.cuda imports CUDA-only extensions: a stand-in with vLLM's choice
        @classmethod
        def get_punica_wrapper(cls) -> str:
            return "vllm.lora.punica_wrapper.punica_gpu.PunicaWrapperGPU"

    monkeypatch.setitem(sys.modules, "vllm.platforms.cuda", SimpleNamespace(CudaPlatformBase=CudaPlatformBase))
    stock_choice = CudaPlatformBase.get_punica_wrapper()
    monkeypatch.setattr(current_platform, "is_cpu", lambda: False)
    monkeypatch.setattr(current_platform, "is_cuda", lambda: True)
    vllm_patches.uninstall()
    try:
        monkeypatch.setenv("KDLORA_RANK_AWARE", "0")
        assert vllm_patches.install() is None and CudaPlatformBase.get_punica_wrapper() == stock_choice
        monkeypatch.delenv("KDLORA_RANK_AWARE")
        monkeypatch.setattr(vllm, "__version__", "0.99.0")
        assert vllm_patches.install() is None and CudaPlatformBase.get_punica_wrapper() == stock_choice
        monkeypatch.setattr(vllm, "__version__", "0.32.0")
        assert vllm_patches.install() == "cuda"
        assert CudaPlatformBase.get_punica_wrapper() == "kdlora_serve.worker.lora_triton.RankAwarePunicaGPU"
        assert vllm_patches.rank_aware(CONFIG) and not vllm_patches.rank_aware(
            SimpleNamespace(fully_sharded_loras=True)
        )  # fully sharded LoRAs keep vLLM's kernels, so each rank is its own LoRA there
    finally:
        vllm_patches.uninstall()
    assert CudaPlatformBase.get_punica_wrapper() == stock_choice


# --- the engine-start self-check and its fallback (kdlora_serve/worker/kernel_check.py) ---------------------------


def modules_of_this_model() -> list[SimpleNamespace]:
    """Stand-ins for vLLM's LoRA layers, holding what the self-check reads: the stacked weights and output slices."""
    linear = [
        SimpleNamespace(lora_a_stacked=WEIGHTS[name][0], lora_b_stacked=WEIGHTS[name][1], output_slices=LAYERS[name])
        for name in ("qkv", "gate_up", "down")
    ]
    lm_head = SimpleNamespace(lora_a_stacked=WEIGHTS["lm_head"][0][0], lora_b_stacked=WEIGHTS["lm_head"][1][0])
    return linear + [lm_head]


class Lines(logging.Handler):
    """kdlora's log lines (vLLM's logger does not propagate to pytest's capture)."""

    def __init__(self):
        super().__init__(logging.INFO)
        self.lines: list[str] = []

    def emit(self, record):
        self.lines.append(record.getMessage())


@pytest.fixture
def engine_start(kdlora, monkeypatch, tmp_path):
    """Start an engine's wrapper as vLLM does (prepare on the model's LoRA layers): the wrapper, kdlora's log lines
    and the report the API server reads."""
    monkeypatch.setattr(kernel_check, "_verdicts", {})
    monkeypatch.setenv(lora_report.ENV, str(tmp_path))
    lines = Lines()
    logger = logging.getLogger("vllm.kdlora")
    logger.addHandler(lines)
    monkeypatch.setattr(logger, "level", logging.INFO)

    def start(punica=None, modules=None):
        punica = punica or wrapper(kdlora)
        punica.prepare(modules or modules_of_this_model())
        return punica, lines.lines, lora_report.read()

    yield start
    logger.removeHandler(lines)


def broken_shrink(*args):
    raise RuntimeError("PTX JIT compilation failed (injected)")


def wrong_shrink(x, lora_a, out, groups, scale, split_k):
    """The real kernel, then rank 0's column dropped: a kernel that compiles and runs and is wrong."""
    REAL_SHRINK(x, lora_a, out, groups, scale, split_k)
    out[:, :, 0] = 0


REAL_SHRINK = lora_triton.lora_shrink


@pytest.mark.parametrize(
    "kernel, failure",
    [
        (
            broken_shrink,
            "linear 64->64+32+32, 8 tokens, float16: kdlora's kernels raised RuntimeError: PTX JIT compilation "
            "failed (injected)",
        ),
        (
            wrong_shrink,
            "linear 64->64+32+32, 8 tokens, float16: kdlora's kernels differ from vLLM's stock kernels: 628 values "
            "off, first at token 1 column 2",
        ),
    ],
    ids=["failing", "wrong"],
)
def test_a_failing_or_wrong_kernel_makes_the_engine_serve_stock_kernels(
    engine_start, stock, monkeypatch, kernel, failure
):
    monkeypatch.setattr(lora_triton, "lora_shrink", kernel)
    punica, lines, reports = engine_start()
    assert punica.stock_kernels
    assert len(lines) == 1 and lines[0].startswith(f"kdlora: LoRA kernel self-check FAILED ({failure}")
    assert lines[0].endswith(
        "this engine serves with vLLM's stock LoRA kernels, each token's rank applied as a mask: correct, but the "
        "cost no longer follows the rank"
    )
    assert [r["kernels"] for r in reports] == ["vllm-stock-masked"] and reports[0]["failure"].startswith(failure)
    full_rank = [token for token, slot in enumerate(TOKEN_SLOTS) if slot != 1]  # base, and every adapter at its R
    for name in LAYERS:  # served after the fallback: vLLM's stock numbers (rank 4 from slot 0, masked, not a copy)
        served = apply(punica, name)
        assert torch.equal(served[full_rank], stock[name][full_rank]), name
        assert_close(served, stock[name])
        assert_close(served, reference(name))


def embedded_model_layers(max_rank: int) -> list[SimpleNamespace]:
    """Stand-ins for the LoRA layers vLLM builds for the embedded SmolLM2 with an `all-linear` adapter (kdlora's:
    q/k/v, o, gate/up, down; PEFT's all-linear leaves lm_head out, so vLLM builds no LoRA logits processor)."""
    from transformers import AutoConfig

    from training.teacher import embedded_teacher

    def layer(shape):
        lora_a = tuple(torch.empty(1, 1, max_rank, shape.hidden, dtype=torch.float16) for _ in shape.widths)
        lora_b = tuple(torch.empty(1, 1, width, max_rank, dtype=torch.float16) for width in shape.widths)
        return SimpleNamespace(lora_a_stacked=lora_a, lora_b_stacked=lora_b, output_slices=shape.widths)

    shapes = kernel_check.decoder_shapes(AutoConfig.from_pretrained(embedded_teacher()))
    assert [str(shape) for shape in shapes] == [  # SmolLM2-135M: 9 heads of 64, 3 KV heads, MLP 1536
        "linear 576->576+192+192",
        "linear 576->576",
        "linear 576->1536+1536",
        "linear 1536->576",
    ]
    return [layer(shape) for shape in shapes]


def test_the_real_kernels_pass_the_self_check_on_every_layer_shape_of_the_embedded_model(kdlora, engine_start):
    """At R = 32 in fp16 (the interpreter has no bf16; R = 32 keeps it to ~1.5 min here): kdlora's kernels keep serving, one line says so, and the API
    server's report says which kernels serve."""
    config = SimpleNamespace(**{**vars(CONFIG), "max_lora_rank": 32})
    punica, lines, reports = engine_start(kdlora(64, 8, "cpu", lora_config=config), embedded_model_layers(32))
    assert not punica.stock_kernels
    assert [line.split(" in ")[0] for line in lines] == [
        "kdlora: LoRA kernel self-check passed (4 layer shapes, ranks 1/8/16/32, 8 and 96 tokens, float16)"
    ]
    assert [(r["kernels"], r["failure"]) for r in reports] == [("kdlora-triton", None)]


class Launches:
    """Every Triton launch of kdlora's two kernels, as a CUDA graph records it: the grid, the tensors' addresses
    and the scalar arguments."""

    def __init__(self, monkeypatch):
        self.log: list[tuple] = []
        for name in ("_shrink_kernel", "_expand_kernel"):
            monkeypatch.setattr(lora_triton, name, self._recording(name, getattr(lora_triton, name)))

    def _recording(self, name, kernel):
        log = self.log

        class Recording:
            def __getitem__(self, grid):
                def launch(*args, **kwargs):
                    values = tuple(a.data_ptr() if isinstance(a, torch.Tensor) else a for a in args)
                    log.append((name, grid, values, tuple(sorted(kwargs.items()))))
                    return kernel[grid](*args, **kwargs)

                return launch

        return Recording()

    def take(self) -> list[tuple]:
        taken, self.log[:] = list(self.log), []
        return taken


def test_a_captured_step_replays_right_after_the_tables_change(kdlora, monkeypatch):
    """What vLLM's CUDA graphs rely on: a decode step's launches for a new batch of the same size are the launches
    recorded for the old one (same grids, same addresses, same scalars: the per-token ranks and groups change only
    inside kdlora's device tables, filled in place), so replaying the captured step computes the new batch. The
    interpreter cannot capture a graph; this shows the launches a graph would hold, and their results for both
    batches. What only a GPU shows: the capture itself, and replay timing."""
    launches = Launches(monkeypatch)
    punica = wrapper(kdlora)
    lora_a, lora_b = WEIGHTS["qkv"]
    y = Y0["qkv"].clone()
    shrunk = torch.zeros(3, len(X), MAX_RANK, dtype=torch.float32)  # persistent, as in a graph's memory pool

    def step():
        y.copy_(Y0["qkv"])
        punica.add_shrink(shrunk, X, lora_a, 1.0)
        punica.add_expand(y, shrunk, lora_b, LAYERS["qkv"], offset_start=0, add_inputs=True)
        return y.clone()

    assert_close(step(), reference("qkv"))
    captured = launches.take()
    other_batch = [3, 1, -1, 0, 0, 2, 1, 3, -1, 2]  # every token moved to another slot or rank
    map_tokens(punica, other_batch)
    assert_close(step(), reference("qkv", other_batch))
    assert launches.take() == captured


def test_the_layers_compile_once_for_every_batch(kdlora):
    """torch.compile (fullgraph, as vLLM compiles the model on CUDA) traces the LoRA calls once; a new batch's tables
    are data, not a reason to recompile."""
    from torch._dynamo.testing import CompileCounter

    punica = wrapper(kdlora)
    lora_a, lora_b = WEIGHTS["qkv"]
    counter = CompileCounter()

    @torch.compile(backend=counter, fullgraph=True)
    def layer(y, x):
        punica.add_lora_linear(y, x, lora_a, lora_b, 1.0, LAYERS["qkv"])
        return y

    assert_close(layer(Y0["qkv"].clone(), X), reference("qkv"))
    other_batch = [3, 1, -1, 0, 0, 2, 1, 3, -1, 2]
    map_tokens(punica, other_batch)
    assert_close(layer(Y0["qkv"].clone(), X), reference("qkv", other_batch))
    assert counter.frame_count == 1
