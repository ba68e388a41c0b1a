"""Distillation mechanics on tiny models with the real vocabulary: nested ranks, exact truncation,
resume after interruption, bad input, and DDP / FSDP over two processes under `accelerate launch`."""

import dataclasses
import json
import subprocess
from pathlib import Path

import pytest
import torch
from conftest import kdlora_cli, kdlora_launch, peft_logits, tiny_checkpoint, tiny_llama
from safetensors.torch import load_file

from hub.adapter import read_adapter, truncate_adapter
from hub.errors import KdloraError
from hub.schema import load_metadata
from training import distill as distill_mod
from training.distill import DistillConfig, run_distill
from training.distill_config import MODES
from training.nested_lora import NestedRank, sample_rank, step_ranks


def tiny_config(tiny_pair, out, **overrides) -> DistillConfig:
    teacher, student = tiny_pair
    settings = dict(
        student=str(student),
        teacher=str(teacher),
        out=Path(out),
        steps=6,
        batch_size=2,
        seq_len=32,
        max_rank=8,
        eval_ranks=(1, 2, 4, 8),
        eval_samples=4,
        quantize="none",
        save_every=2,
        lr=1e-2,
    )
    return DistillConfig(**{**settings, **overrides})


def _random_lora(tiny_pair, rslora=False):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    base = AutoModelForCausalLM.from_pretrained(tiny_pair[1], dtype=torch.float32)
    model = get_peft_model(
        base, LoraConfig(r=8, lora_alpha=16, use_rslora=rslora, target_modules="all-linear", init_lora_weights=False)
    )
    return model, NestedRank(model)


@pytest.mark.parametrize("rslora", [False, True], ids=["alpha/b", "rslora alpha/sqrt(b)"])
def test_training_forward_at_rank_b_equals_peft_on_the_truncated_adapter(tiny_pair, tmp_path, rslora):
    model, nested = _random_lora(tiny_pair, rslora)
    ids = torch.randint(0, 49152, (2, 10), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        at_rank = {}
        for b in (1, 3, 8):
            nested.set(b)
            at_rank[b] = model(ids).logits
        nested.remove()
        model.save_pretrained(tmp_path / "full")
    from hub.schema import ModelRef, RankMetadata

    RankMetadata(max_rank=8, default_rank=8, base_model=ModelRef(id="tiny")).save(tmp_path / "full")
    base = model.unload()
    for b, logits in at_rank.items():
        truncated = truncate_adapter(tmp_path / "full", b, tmp_path / f"r{b}")
        # masked rank-R matmuls vs rank-b matmuls sum in different orders: ~1e-5 apart, while ranks differ by >0.1
        torch.testing.assert_close(peft_logits(base, truncated, ids), logits, rtol=1e-4, atol=1e-4)
    assert (at_rank[1] - at_rank[8]).abs().max() > 0.1


def test_a_step_at_rank_b_trains_only_what_rank_b_uses(tiny_pair):
    model, nested = _random_lora(tiny_pair)
    nested.set(3)
    model(torch.randint(0, 49152, (1, 8))).logits.sum().backward()
    layer = nested.layers[0]
    a_grad, b_grad = layer.lora_A["default"].weight.grad, layer.lora_B["default"].weight.grad
    assert a_grad[:3].abs().sum() > 0 and b_grad[:, :3].abs().sum() > 0
    assert a_grad[3:].abs().sum() == 0 and b_grad[:, 3:].abs().sum() == 0


def test_rank_zero_is_the_base_model(tiny_pair):
    model, nested = _random_lora(tiny_pair)
    ids = torch.randint(0, 49152, (1, 8))
    with torch.no_grad():
        nested.set(0)
        off = model(ids).logits
        with model.disable_adapter():
            base = model(ids).logits
    torch.testing.assert_close(off, base)


def test_rank_b_multiplies_b_components_and_computes_what_peft_computes():
    """Rank b computes with the first b rows of A and columns of B only (masking the components >= b cost rank R's
    products at every rank), with PEFT's own numbers: plain PEFT on the adapter truncated to b, bit for bit, on a bf16
    base with fp32 LoRA weights (PEFT's layout), without autocast (the input cast to fp32) and under CPU bf16 autocast.
    There the input reaches lora_A in bf16: PEFT, which asks CUDA's autocast only, cast it to fp32 and back."""
    from peft import LoraConfig, get_peft_model

    def lora(r):
        torch.manual_seed(0)
        base = torch.nn.Sequential(torch.nn.Linear(16, 12)).to(torch.bfloat16)
        return get_peft_model(base, LoraConfig(r=r, target_modules=["0"], init_lora_weights=False))

    nested_model, x = lora(8), torch.randn(3, 16, dtype=torch.bfloat16)
    nested, seen = NestedRank(nested_model), []
    lora_a = nested.layers[0].lora_A["default"]
    assert lora_a.weight.dtype == torch.float32
    lora_a.register_forward_hook(lambda module, args, out: seen.append((args[0].dtype, out.shape[-1])))
    for b in (1, 3, 8):
        plain = lora(b)
        for name, param in plain.named_parameters():  # rank b's slice of the rank-8 adapter
            full = dict(nested_model.named_parameters())[name]
            param.data.copy_(full[:b] if "lora_A" in name else full[:, :b] if "lora_B" in name else full)
        nested.set(b)
        assert plain.base_model.model[0].scaling == nested.layers[0].scaling  # PEFT's alpha / r at r = b
        for autocast in (False, True):
            with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
                assert torch.equal(nested_model(x), plain(x))
    assert seen == [(torch.bfloat16, b) for b in (1, 3, 8) for _ in (False, True)]
    nested.set(0)
    with torch.no_grad():
        assert torch.equal(nested_model(x), nested_model.base_model.model[0].base_layer(x)) and seen[-1][1] == 0
    nested.remove()
    assert "forward" not in vars(lora_a) and nested.layers[0].cast_input_dtype_enabled


@pytest.mark.parametrize("rslora", [False, True], ids=["alpha/b", "rslora alpha/sqrt(b)"])
def test_copies_of_a_batch_each_compute_and_train_at_their_own_rank(tiny_pair, rslora):
    """`set_copies((8, 3, 1), rows)` on the batch repeated three times: copy k's logits are rank k's from `set`, and
    one backward of the copies' weighted losses gives the gradients of one pass per rank. Checked in fp64, where only
    the copies' fp32 weights (1/3 to fp32's precision) part them (logits by 1e-7, gradients by 2.4e-9; with fp64
    weights by 1e-15): in fp32 they differ by rounding whose size follows the CPU's kernels (1.6e-5 on logits of 0.5
    at rank 1 on an AMD AVX512-BF16 host, each way that far from fp64's; 0 on an Intel one)."""
    model, nested = _random_lora(tiny_pair, rslora)
    model.double()
    ids = torch.randint(0, 49152, (2, 10), generator=torch.Generator().manual_seed(0))
    ranks, weights = (8, 3, 1), (0.5, 0.3, 0.2)
    params = [p for p in model.parameters() if p.requires_grad]
    per_rank = []
    for rank, weight in zip(ranks, weights):
        nested.set(rank)
        logits = model(ids).logits
        (logits.square().mean() * weight).backward()
        per_rank.append(logits.detach())
    one_pass_each = [p.grad.clone() for p in params]
    model.zero_grad()
    nested.set_copies(ranks, rows=len(ids))
    copies = model(ids.repeat(len(ranks), 1)).logits.chunk(len(ranks))
    sum(c.square().mean() * w for c, w in zip(copies, weights)).backward()
    for copy, logits in zip(copies, per_rank):
        torch.testing.assert_close(copy.detach(), logits, rtol=1e-6, atol=1e-6)
    assert (per_rank[0] - per_rank[2]).abs().max() > 0.1  # the copies differ as the ranks do
    for together, apart in zip((p.grad for p in params), one_pass_each):
        torch.testing.assert_close(together, apart, rtol=1e-5, atol=1e-8)
    model.float()  # CPU autocast casts fp32, not fp64
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):  # as bf16 training computes: the same, rounded
        nested.set_copies(ranks, rows=len(ids))
        in_bf16 = model(ids.repeat(len(ranks), 1)).logits.float().chunk(len(ranks))
        for rank, copy in zip(ranks, in_bf16):
            nested.set(rank)
            torch.testing.assert_close(copy, model(ids).logits.float(), rtol=0, atol=0.05)  # a wrong scale: > 0.5
    nested.set_copies((3,), rows=len(ids))  # one rank: that rank's own products (the first 3 rows of A only)
    assert nested.rank == 3 and not nested._weights
    with pytest.raises(ValueError, match=r"^rank \(8, 0\) is outside 0..8$"):
        nested.set_copies((8, 0), rows=2)


def test_a_sandwich_run_is_the_same_with_its_ranks_in_one_forward_or_one_each(tiny_pair, tmp_path):
    """--batch-ranks on against off, fp32: the same losses, step by step, and the same adapter."""
    runs = {}
    for batched in ("on", "off"):
        cfg = tiny_config(tiny_pair, tmp_path / batched, rank_distribution="sandwich", steps=3, eval_ranks=(1,))
        runs[batched] = run_distill(dataclasses.replace(cfg, batch_ranks=batched))
    together, apart = (r["history"] for r in (runs["on"], runs["off"]))
    assert [h["ranks"] for h in together] == [h["ranks"] for h in apart] and len(together[0]["ranks"]) == 3
    for one, other in zip(together, apart):
        assert (one["loss"], one["kl"], one["ce"]) == pytest.approx((other["loss"], other["kl"], other["ce"]), rel=1e-4)
    adapters = [load_file(tmp_path / batched / "adapter_model.safetensors") for batched in ("on", "off")]
    for name, tensor in adapters[0].items():
        torch.testing.assert_close(tensor, adapters[1][name], rtol=1e-3, atol=1e-5)


def test_rank_sampling_is_seeded_and_in_range():
    uniform = [sample_rank(step, 0, 64) for step in range(200)]
    assert uniform == [sample_rank(step, 0, 64) for step in range(200)] and min(uniform) >= 1 and max(uniform) <= 64
    assert len(set(uniform)) > 30
    assert set(sample_rank(step, 0, 48, "pow2") for step in range(200)) == {1, 2, 4, 8, 16, 32, 48}


def test_sandwich_trains_the_largest_and_smallest_rank_every_step():
    steps = [step_ranks(step, 3, 16, "sandwich") for step in range(100)]
    assert steps == [step_ranks(step, 3, 16, "sandwich") for step in range(100)]  # a pure function of (seed, step)
    assert all(ranks[0] == 16 and ranks[-1] == 1 and ranks == sorted(set(ranks), reverse=True) for ranks in steps)
    assert all(len(ranks) == 3 for ranks in steps) and {r[1] for r in steps} <= set(range(2, 16))
    assert step_ranks(5, 0, 64) == [sample_rank(5, 0, 64)]
    assert step_ranks(0, 0, 2, "sandwich") == [2, 1] and step_ranks(0, 0, 1, "sandwich") == [1]


def test_sandwich_samples_the_rank_between_log_uniformly():
    """Every octave between 1 and R as often (2-3, 4-7, ..., 32-63 at R = 64: a fifth each), and every rank some of the time."""
    between = [step_ranks(step, 0, 64, "sandwich")[1] for step in range(5000)]
    octaves = [sum(2**k <= r < 2 ** (k + 1) for r in between) / len(between) for k in range(1, 6)]
    assert all(abs(share - 0.2) < 0.03 for share in octaves), octaves
    assert set(between) == set(range(2, 64))


def test_matryoshka_mixture_is_the_mean_of_its_ranks_and_trains_every_component():
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(0)
    model = get_peft_model(
        torch.nn.Sequential(torch.nn.Linear(8, 6)),
        LoraConfig(r=4, lora_alpha=8, target_modules=["0"], init_lora_weights=False),
    )
    nested, x = NestedRank(model), torch.randn(3, 8)

    def output(rank):
        nested.set(rank)
        return model(x)

    torch.testing.assert_close(
        output((1, 2, 4)), (output(1) + output(2) + output(4)) / 3
    )  # one layer: linear in the ranks
    output((1, 2, 4)).sum().backward()
    lora_a = next(p for name, p in model.named_parameters() if "lora_A" in name)
    assert bool((lora_a.grad.abs().sum(dim=1) > 0).all())  # every component, rank 3 included, gets gradient
    torch.testing.assert_close(output(2), output((2,)))  # a one-rank mixture is that rank
    assert step_ranks(7, 0, 16, "matryoshka") == [(1, 2, 4, 8, 16)] and step_ranks(0, 0, 12, "matryoshka") == [
        (1, 2, 4, 8, 12)
    ]
    with pytest.raises(ValueError, match="outside 0..4"):
        nested.set((0, 2))


@pytest.mark.parametrize("rslora", [False, True], ids=["alpha/b", "rslora alpha/sqrt(b)"])
def test_scale_weighting_makes_every_rank_pull_a_shared_component_equally(rslora):
    """One LoRA layer: a component every rank uses gets from rank b's loss a gradient times b's scale. Weighted by
    1 / scale (normalised), every rank of a step pulls it equally; the plain mean lets rank 1 pull hardest."""
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(0)
    model = get_peft_model(
        torch.nn.Sequential(torch.nn.Linear(8, 6)),
        LoraConfig(r=4, lora_alpha=8, use_rslora=rslora, target_modules=["0"], init_lora_weights=False),
    )
    nested, x = NestedRank(model), torch.randn(3, 8)
    lora_b = next(p for name, p in model.named_parameters() if "lora_B" in name)
    ranks, pulls = [4, 2, 1], {}
    for weighting in ("scale", "equal"):
        for rank, weight in zip(ranks, nested.loss_weights(ranks, weighting)):
            nested.set(rank)
            model.zero_grad()
            (model(x).sum() * weight).backward()
            pulls[weighting, rank] = lora_b.grad[:, 0].clone()
    for rank in ranks[1:]:
        torch.testing.assert_close(pulls["scale", rank], pulls["scale", 4])
    torch.testing.assert_close(pulls["equal", 1], pulls["equal", 4] * (2 if rslora else 4))
    inverse = [4**0.5, 2**0.5, 1] if rslora else [4, 2, 1]
    assert nested.loss_weights(ranks, "scale") == pytest.approx([w / sum(inverse) for w in inverse])
    assert nested.loss_weights(ranks, "equal") == [1 / 3] * 3 and nested.loss_weights([(1, 2, 4)]) == [1.0]


def test_sandwich_run_trains_every_rank_it_names(tiny_pair, tmp_path):
    report = run_distill(tiny_config(tiny_pair, tmp_path / "adapter", rank_distribution="sandwich", steps=3))
    assert [h["ranks"][0] for h in report["history"]] == [8] * 3 and all(h["ranks"][-1] == 1 for h in report["history"])
    recipe = json.loads((tmp_path / "adapter" / "kdlora.json").read_text())["recipe"]
    assert (recipe["rank_distribution"], recipe["rank_weighting"]) == ("sandwich", "scale")
    equal = run_distill(
        tiny_config(tiny_pair, tmp_path / "equal", rank_distribution="sandwich", steps=3, rank_weighting="equal")
    )
    assert equal["history"][0]["loss"] == pytest.approx(report["history"][0]["loss"])  # same start (B = 0) ...
    scaled, plain = (load_file(tmp_path / run / "adapter_model.safetensors") for run in ("adapter", "equal"))
    assert any(not torch.equal(scaled[name], plain[name]) for name in scaled)  # ... other updates


def test_inplace_kd_distils_the_smaller_ranks_from_the_largest_of_the_same_step(tiny_pair, tmp_path):
    """At step 1 every rank is still the student itself (B = 0), so the smallest rank's KL to the largest rank's
    outputs is 0, while its KL to the teacher is not; the largest rank distils the teacher either way."""
    sandwich = tiny_config(
        tiny_pair, tmp_path / "teacher-target", rank_distribution="sandwich", steps=1, eval_ranks=(1,)
    )
    to_teacher = run_distill(sandwich)["history"][0]
    inplace = run_distill(dataclasses.replace(sandwich, out=tmp_path / "inplace", inplace_kd=True))["history"][0]
    assert inplace["ranks"] == to_teacher["ranks"] and inplace["ranks"][-1] == 1
    assert inplace["kl"] == pytest.approx(0, abs=1e-6) and to_teacher["kl"] > 0.01
    with pytest.raises(
        KdloraError,
        match=r"^--inplace-kd distils a step's smaller ranks from its largest; it needs --train qdylora "
        r"--rank-distribution sandwich and a --kd-alpha above 0$",
    ):
        run_distill(
            dataclasses.replace(sandwich, out=tmp_path / "uniform", inplace_kd=True, rank_distribution="uniform")
        )


def test_qdylora_run_writes_a_nested_adapter_with_metadata(tiny_pair, tmp_path):
    report = run_distill(tiny_config(tiny_pair, tmp_path / "adapter"))
    out = tmp_path / "adapter"
    adapter = read_adapter(out)
    meta = load_metadata(out)
    assert (meta.max_rank, meta.nested, [r.rank for r in meta.ranks]) == (8, True, [1, 2, 4, 8])
    assert meta.base_quality.kl_to_teacher == pytest.approx(report["before"]["kl_to_teacher"])
    assert all(r.kl_to_teacher is not None and r.adapter_bytes > 0 for r in meta.ranks)
    assert [r.adapter_bytes for r in meta.ranks] == sorted(r.adapter_bytes for r in meta.ranks)
    assert meta.recipe.steps == 6 and meta.recipe.data_fingerprint
    assert {"README.md", "quality_vs_rank.png", "distill_report.json"} <= {p.name for p in out.iterdir()}
    assert max(adapter.module_ranks.values()) == 8
    assert not Path(f"{out}.checkpoint").exists()  # removed once the result is in place


def test_nf4_base_trains_too(tiny_pair, tmp_path):
    run_distill(tiny_config(tiny_pair, tmp_path / "adapter", quantize="nf4", steps=2))
    assert load_metadata(tmp_path / "adapter").recipe.quantization == "nf4"


def test_full_mode_writes_a_student_checkpoint(tiny_pair, tmp_path):
    from transformers import AutoModelForCausalLM

    report = run_distill(tiny_config(tiny_pair, tmp_path / "healed", train="full", steps=2))
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "healed")
    assert model.config.hidden_size == 32 and (tmp_path / "healed" / "tokenizer.json").is_file()
    assert report["mode"] == "full" and set(report["after"]) == {"None"}


def test_top_layers_train_the_last_layers_and_leave_the_rest_as_they_were(tiny_pair, tmp_path):
    from transformers import AutoModelForCausalLM

    cfg = tiny_config(tiny_pair, tmp_path / "top", train="full", steps=2, top_layers=1)
    run_distill(cfg)
    before = AutoModelForCausalLM.from_pretrained(cfg.student).state_dict()
    after = AutoModelForCausalLM.from_pretrained(cfg.out).state_dict()
    changed = {name for name in before if not torch.equal(before[name], after[name])}
    # the last of the 2 layers and the final norm; the embeddings (and the head tied to them) and layer 0 as they were
    assert changed == {name for name in before if name.startswith("model.layers.1.")} | {"model.norm.weight"}


@pytest.fixture(scope="module")
def fp32_runs(tiny_pair, tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("fp32_runs")
    return {
        mode: run_distill(tiny_config(tiny_pair, root / mode, steps=6, eval_ranks=(8,), train=mode))
        for mode in ("qdylora", "full")
    }


@pytest.mark.parametrize(
    "options",
    [
        {"dtype": "bf16"},
        {"teacher_quantize": "nf4"},
        {"teacher_quantize": "int8"},
        {"dtype": "bf16", "teacher_quantize": "nf4"},  # the teacher's head check under autocast, on this CPU's path
        {"train": "full", "dtype": "bf16", "optimizer": "adamw8bit"},
    ],
    ids=str,
)
def test_precision_and_memory_options_train_close_to_fp32(tiny_pair, tmp_path, fp32_runs, options):
    """Each option trains what the fp32 run trains, to within 1% of its loss at every step, and writes the usual
    result in fp32 (adapters on a bf16 base are fp32; full training keeps fp32 weights under bf16 autocast)."""
    mode = options.get("train", "qdylora")
    report = run_distill(tiny_config(tiny_pair, tmp_path / "out", steps=6, eval_ranks=(8,), **options))
    assert [h["loss"] for h in report["history"]] == pytest.approx(
        [h["loss"] for h in fp32_runs[mode]["history"]], rel=1e-2
    )
    weights = load_file(tmp_path / "out" / ("model.safetensors" if mode == "full" else "adapter_model.safetensors"))
    assert {t.dtype for t in weights.values()} == {torch.float32}
    if mode == "full":  # the healing run learns: held-out KL falls, as in fp32
        assert report["after"]["None"]["kl_to_teacher"] < report["before"]["kl_to_teacher"]
    else:  # the adapter moved away from its zero-initialised B
        assert max(t.abs().max().item() for name, t in weights.items() if "lora_B" in name) > 0


@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
def test_nf4_teacher_on_bitsandbytes_generic_cpu_path(tiny_pair, tmp_path, fp32_runs, monkeypatch, dtype):
    """A frozen NF4 teacher takes bitsandbytes' packed path on AVX512-BF16 CPUs (the parametrized test above, here)
    and the generic one elsewhere: forced here, so both branches run on this machine, in fp32 and under bf16
    autocast."""
    import bitsandbytes.nn.modules

    monkeypatch.setattr(bitsandbytes.nn.modules, "has_avx512bf16", lambda: False)
    config = tiny_config(tiny_pair, tmp_path / "out", steps=6, eval_ranks=(8,), teacher_quantize="nf4", dtype=dtype)
    report = run_distill(config)
    assert [h["loss"] for h in report["history"]] == pytest.approx(
        [h["loss"] for h in fp32_runs["qdylora"]["history"]], rel=1e-2
    )


def test_gradient_checkpointing_changes_memory_not_the_result(tiny_pair, tmp_path):
    plain = run_distill(tiny_config(tiny_pair, tmp_path / "plain", steps=3))
    recomputed = run_distill(tiny_config(tiny_pair, tmp_path / "recomputed", steps=3, gradient_checkpointing=True))
    assert [h["loss"] for h in recomputed["history"]] == pytest.approx([h["loss"] for h in plain["history"]], rel=1e-5)


def test_eight_bit_adamw_keeps_8_bit_states():
    from training.distill import make_optimizer

    big, small = torch.nn.Parameter(torch.randn(64, 64)), torch.nn.Parameter(torch.randn(8))
    optimizer = make_optimizer("adamw8bit", [big, small], 1e-3)
    big.grad, small.grad = torch.randn_like(big), torch.randn_like(small)
    optimizer.step()
    assert (
        optimizer.state[big]["state1"].dtype == torch.uint8 and optimizer.state[small]["state1"].dtype == torch.float32
    )


def test_adamw_is_pytorchs_fused_kernel_where_it_has_one_and_steps_as_the_loop_does():
    """Fused on CPU and CUDA (transformers' Trainer default); on other devices PyTorch's default. Its steps are the
    for-loop's up to rounding."""
    from training.distill import make_optimizer

    torch.manual_seed(0)
    fused, looped = torch.nn.Parameter(torch.randn(64, 32)), torch.nn.Parameter(torch.randn(64, 32))
    looped.data.copy_(fused.data)
    optimizers = make_optimizer("adamw", [fused], 1e-2), torch.optim.AdamW([looped], lr=1e-2, weight_decay=0.0)
    for step in range(10):
        grad = torch.randn(64, 32, generator=torch.Generator().manual_seed(step))
        fused.grad, looped.grad = grad.clone(), grad.clone()
        for optimizer in optimizers:
            optimizer.step()
    assert optimizers[0].defaults["fused"] and not optimizers[1].defaults["fused"]
    torch.testing.assert_close(fused.data, looped.data, rtol=0, atol=1e-6)
    assert not make_optimizer("adamw", [torch.nn.Parameter(torch.randn(2, device="meta"))], 1e-3).defaults["fused"]


def interrupted_run(cfg: DistillConfig, monkeypatch, at_step: int) -> None:
    """`run_distill(cfg)` stopped by Ctrl-C before step `at_step` (it saves a checkpoint there)."""
    original = distill_mod.Mode.step_ranks

    def ctrl_c(mode, cfg, step):
        if step == at_step:
            raise KeyboardInterrupt
        return original(mode, cfg, step)

    monkeypatch.setattr(distill_mod.Mode, "step_ranks", ctrl_c)
    with pytest.raises(KeyboardInterrupt):
        run_distill(cfg)
    monkeypatch.setattr(distill_mod.Mode, "step_ranks", original)


@pytest.mark.parametrize(
    "options", [{}, {"train": "full", "optimizer": "adamw8bit"}], ids=["qdylora", "full-adamw8bit"]
)
def test_resume_after_interruption_gives_the_uninterrupted_result(tiny_pair, tmp_path, monkeypatch, options):
    """Also for bitsandbytes' 8-bit AdamW, whose quantized states go through the checkpoint's by-name form."""
    run_distill(tiny_config(tiny_pair, tmp_path / "straight", **options))
    interrupted_run(tiny_config(tiny_pair, tmp_path / "resumed", **options), monkeypatch, at_step=3)
    checkpoint = tmp_path / "resumed.checkpoint"
    assert json.loads((checkpoint / "state.json").read_text())["step"] == 3  # Ctrl-C saved where it stopped
    assert not (tmp_path / "resumed").exists()
    run_distill(tiny_config(tiny_pair, tmp_path / "resumed", resume=True, **options))
    weights = "adapter_model.safetensors" if not options else "model.safetensors"
    straight, resumed = (load_file(tmp_path / run / weights) for run in ("straight", "resumed"))
    for name in straight:
        torch.testing.assert_close(resumed[name], straight[name], rtol=1e-6, atol=1e-7)
    if not options:
        assert load_metadata(tmp_path / "resumed").ranks == load_metadata(tmp_path / "straight").ranks


def test_a_resume_with_other_eval_samples_measures_the_start_again(tiny_pair, tmp_path, monkeypatch):
    """The student alone and the teacher are scored on the same held-out examples as every rank (paired
    differences need that), so a resume that evaluates fewer examples measures them again on the initial weights."""
    data = str(_labelled_data(tmp_path / "parity.jsonl"))
    interrupted_run(tiny_config(tiny_pair, tmp_path / "out", data=data, eval_samples=4), monkeypatch, at_step=2)
    run_distill(tiny_config(tiny_pair, tmp_path / "out", data=data, eval_samples=2, resume=True))
    meta = load_metadata(tmp_path / "out")
    for quality in [meta.base_quality, meta.teacher_quality, *meta.ranks]:
        assert len(quality.task_outcomes["accuracy"]) == 2
    run_distill(tiny_config(tiny_pair, tmp_path / "straight", data=data, eval_samples=2))
    straight = load_metadata(tmp_path / "straight")
    assert meta.base_quality == straight.base_quality and meta.teacher_quality == straight.teacher_quality


def test_a_checkpoint_of_an_older_kdlora_is_refused_by_name(tiny_pair, tmp_path, monkeypatch):
    """Before checkpoints were keyed by parameter name, optimizer.pt held torch's own state dict (by position)."""
    interrupted_run(tiny_config(tiny_pair, tmp_path / "out"), monkeypatch, at_step=2)
    saved = tmp_path / "out.checkpoint" / "optimizer.pt"
    old = torch.load(saved, weights_only=True)
    torch.save(
        {**old, "optimizer": {"state": {0: {"step": torch.tensor(2.0)}}, "param_groups": [{"params": [0]}]}}, saved
    )
    with pytest.raises(
        KdloraError,
        match=r"out.checkpoint was written by an older kdlora \(optimizer state by parameter position, not by name\); delete it",
    ):
        run_distill(tiny_config(tiny_pair, tmp_path / "out", resume=True))


def test_resume_with_other_settings_is_refused(tiny_pair, tmp_path, monkeypatch):
    monkeypatch.setattr(
        distill_mod.Mode,
        "step_ranks",
        lambda mode, cfg, step: (_ for _ in ()).throw(KeyboardInterrupt) if step == 2 else [1],
    )
    with pytest.raises(KeyboardInterrupt):
        run_distill(tiny_config(tiny_pair, tmp_path / "a"))
    with pytest.raises(
        KdloraError,
        match=r"--resume: the checkpoint in .*a.checkpoint was made with other settings \(kd_alpha: 0.5 -> 0.9\)",
    ):
        run_distill(tiny_config(tiny_pair, tmp_path / "a", resume=True, kd_alpha=0.9))
    with pytest.raises(KdloraError, match="holds an unfinished run for this --out; add --resume to continue it"):
        run_distill(tiny_config(tiny_pair, tmp_path / "a"))
    # the same SPEC giving other data (a builtin changed, a file was edited), or a checkpoint that did not record it
    state_file = tmp_path / "a.checkpoint" / "state.json"
    state = json.loads(state_file.read_text())
    for fingerprint in ("0" * 64, None):
        state_file.write_text(json.dumps({**state, "data_fingerprint": fingerprint}))
        with pytest.raises(
            KdloraError,
            match=r"^--resume: the checkpoint in .*a.checkpoint was made from other data than builtin:pydoc gives now "
            r"\(or by a kdlora that did not record it\); delete the checkpoint to start over$",
        ):
            run_distill(tiny_config(tiny_pair, tmp_path / "a", resume=True))


@pytest.mark.parametrize(
    "overrides, message",
    [
        ({"max_rank": 0}, "ranks must be positive: --max-rank 0"),
        ({"eval_ranks": (4, 16)}, "--eval-ranks 16 above --max-rank 8; list ranks <= 8"),
        (
            {"train": "full", "quantize": "nf4"},
            "--train full updates every weight, which a 4-bit base cannot hold; add --quantize none",
        ),
        ({"batch_size": 5000}, "fewer than one batch"),
        (
            {"dtype": "fp16"},
            "--dtype fp16 needs a CUDA GPU (CPUs compute fp16 slowly and autocast does not support it there); use bf16 or fp32",
        ),
        ({"optimizer": "sgd"}, "--optimizer sgd: use one of adamw, adamw8bit, paged_adamw8bit"),
        ({"loss_chunk_tokens": 0}, "--loss-chunk-tokens must be at least 1"),
        (
            {"top_layers": 1},
            "--top-layers 1: it trains the last N >= 1 decoder layers of a --train full run (an adapter's base is "
            "frozen whole); give N >= 1 with --train full, or drop it",
        ),
        ({"train": "full", "top_layers": 3}, "--top-layers 3: the student has 2 decoder layers; give 1 to 2"),
        (
            {"evaluate_before": False},
            "--no-evaluate-before: an adapter's card compares every rank with the student alone, measured before "
            "training; drop the option (it is for --train full)",
        ),
    ],
)
def test_bad_settings(tiny_pair, tmp_path, overrides, message):
    with pytest.raises(KdloraError, match=message.replace("(", r"\(").replace(")", r"\)")):
        run_distill(tiny_config(tiny_pair, tmp_path / "out", **overrides))
    assert not (tmp_path / "out").exists()


def test_different_vocabularies_are_refused(tiny_pair, tmp_path, real_tokenizer_dir):
    from transformers import AutoTokenizer

    other = tiny_checkpoint(tmp_path / "other", real_tokenizer_dir, seed=2)
    tokenizer = AutoTokenizer.from_pretrained(other)
    tokenizer.add_tokens(["<kdlora-extra>"])
    tokenizer.save_pretrained(other)
    result = kdlora_cli(
        "distill",
        "--teacher",
        str(other),
        "--student",
        str(tiny_pair[1]),
        "--out",
        str(tmp_path / "out"),
        "--steps",
        "1",
        "--quantize",
        "none",
    )
    assert result.returncode == 1
    errors = [line for line in result.stderr.splitlines() if line.startswith("kdlora: error:")]
    assert errors == [result.stderr.strip().splitlines()[-1]]
    assert errors[0].startswith(
        "kdlora: error: teacher and student tokenizers differ: distillation compares next-token distributions"
    )


TWO_PROCESS_RUN = (
    "--quantize",
    "none",
    "--steps",
    "3",
    "--batch-size",
    "4",
    "--seq-len",
    "32",
    "--max-rank",
    "4",
    "--eval-ranks",
    "1,4",
    "--eval-samples",
    "4",
    "--save-every",
    "2",
)


def launch_two_processes(config: str, tiny_pair, out: Path, *extra: str) -> subprocess.CompletedProcess:
    teacher, student = tiny_pair
    return kdlora_launch(
        config,
        "distill",
        "--teacher",
        str(teacher),
        "--student",
        str(student),
        "--out",
        str(out),
        *TWO_PROCESS_RUN,
        *extra,
    )


@pytest.fixture(scope="module")
def two_process_runs(tiny_pair, tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("two_processes")
    runs = {}
    for config in ("ddp.yaml", "fsdp.yaml"):
        result = launch_two_processes(config, tiny_pair, root / config)
        assert result.returncode == 0, result.stderr[-4000:]
        assert result.stdout.split() == [str(root / config)]  # printed once, by the main process
        runs[config] = root / config
    return runs


def test_ddp_and_fsdp_over_two_processes_write_the_same_adapter(two_process_runs):
    reports = {
        config: json.loads((out / "distill_report.json").read_text()) for config, out in two_process_runs.items()
    }
    assert [(r["processes"], r["sharded"]) for r in reports.values()] == [(2, False), (2, True)]
    # each process trained on its half of every batch: step 1's loss (the main process's) is that of the first half
    halves = _first_step_losses(reports["ddp.yaml"]["config"])
    assert reports["ddp.yaml"]["history"][0]["loss"] == pytest.approx(halves[0], rel=1e-6)
    assert halves[0] != pytest.approx(halves[1], rel=1e-4)
    for out in two_process_runs.values():
        assert read_adapter(out).metadata.max_rank == 4
    ddp, fsdp = (load_file(out / "adapter_model.safetensors") for out in two_process_runs.values())
    assert sorted(ddp) == sorted(fsdp)
    for name in ddp:  # sharding divides where the numbers live, not what they are
        torch.testing.assert_close(fsdp[name], ddp[name], rtol=1e-5, atol=1e-6)
    assert [h["loss"] for h in reports["fsdp.yaml"]["history"]] == pytest.approx(
        [h["loss"] for h in reports["ddp.yaml"]["history"]], rel=1e-6
    )


def test_a_single_process_checkpoint_resumes_under_fsdp(two_process_runs, tiny_pair, tmp_path, monkeypatch):
    """Checkpoints hold whole tensors keyed by name whatever wrote them; FSDP shards them again when it resumes."""
    fingerprint = json.loads((two_process_runs["ddp.yaml"] / "distill_report.json").read_text())["config"]
    interrupted_run(
        DistillConfig(**fingerprint, out=tmp_path / "resumed", eval_ranks=(1, 4), eval_samples=4),
        monkeypatch,
        at_step=2,
    )
    result = launch_two_processes("fsdp.yaml", tiny_pair, tmp_path / "resumed", "--resume")
    assert result.returncode == 0, result.stderr[-4000:]
    assert "resuming from step 2" in result.stderr
    resumed, straight = (
        load_file(out / "adapter_model.safetensors") for out in (tmp_path / "resumed", two_process_runs["ddp.yaml"])
    )
    for name in straight:  # steps 1-2 on the whole batch in one process, step 3 on halves: equal up to summation order
        torch.testing.assert_close(resumed[name], straight[name], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize(
    "kl, default",
    [({1: 0.30, 4: 0.26, 8: 0.25}, 4), ({1: 2e-7, 4: -3e-8, 8: -4e-8}, 8), ({1: 0.0, 4: 0.0, 8: 0.0}, 1)],
    ids=["within-10%", "rounding-below-zero", "all-zero"],
)
def test_the_default_rank_is_the_smallest_within_10_percent_of_the_best_kl(kl, default):
    after = {rank: {"kl_to_teacher": value} for rank, value in kl.items()}
    assert distill_mod._default_rank(None, MODES["qdylora"], after) == default


def test_fsdp_on_cpu_refuses_an_older_accelerate_and_warns_on_a_newer_one(caplog):
    from training.processes import _check_fsdp_on_cpu

    with pytest.raises(KdloraError) as refused:
        _check_fsdp_on_cpu("1.14.2")
    assert str(refused.value) == (
        "FSDP on CPU processes needs accelerate >= 1.15 (this is 1.14.2); "
        "upgrade accelerate or launch without the FSDP config (DDP)"
    )
    _check_fsdp_on_cpu("1.16.0")
    assert caplog.records == []
    _check_fsdp_on_cpu("1.17.0.dev0")
    assert [r.getMessage() for r in caplog.records] == [
        "FSDP on CPU processes was checked with accelerate 1.15/1.16; this is 1.17.0.dev0 "
        "(unchecked, tests/test_distill.py checks it)"
    ]


def test_full_training_under_fsdp_equals_one_process(tiny_pair, tmp_path):
    """Every weight trains and is sharded (tied embeddings, the LM head the chunked loss applies outside the forward,
    gradient clipping over sharded gradients): two FSDP processes give what one process gives on the whole batch."""
    result = launch_two_processes("fsdp.yaml", tiny_pair, tmp_path / "fsdp", "--train", "full")
    assert result.returncode == 0, result.stderr[-4000:]
    fingerprint = json.loads((tmp_path / "fsdp" / "distill_report.json").read_text())["config"]
    run_distill(DistillConfig(**fingerprint, out=tmp_path / "one", eval_samples=4))
    sharded, one = (load_file(tmp_path / out / "model.safetensors") for out in ("fsdp", "one"))
    assert sorted(sharded) == sorted(one)
    for name in one:
        torch.testing.assert_close(sharded[name], one[name], rtol=1e-5, atol=1e-6)


def _first_step_losses(fingerprint: dict) -> list[float]:
    """Step 1's loss on each half of the batch (rows 0, 2 and 1, 3), computed in one process."""
    from training.data import trimmed
    from training.distill import MODES, build_student, load_data, load_teacher, rows_for_step, target_source
    from training.losses import ChunkedKDLoss, final_hidden_states

    cfg = DistillConfig(**fingerprint, out=Path("unused"))  # the run's own settings, from its report
    teacher, _, _ = load_teacher(cfg, torch.device("cpu"))
    student, tokenizer, nested = build_student(cfg, torch.device("cpu"))
    data = load_data(cfg, tokenizer, 2)
    rows = rows_for_step(len(data.train), 0, cfg.batch_size, cfg.seed)
    batch, mask = trimmed(data.train[rows], data.train_mask[rows])
    nested.set(MODES[cfg.train].step_ranks(cfg, 0)[0])
    losses = []
    for half in (0, 1):
        tokens, learned = batch[half::2], mask[half::2, 1:]
        target = target_source(cfg, teacher, None, torch.device("cpu"))(tokens, learned, rows[half::2])
        with torch.no_grad(), final_hidden_states(student) as head:
            hidden = student(tokens).logits[:, :-1][learned]
            losses.append(
                ChunkedKDLoss(cfg.kd_alpha, cfg.kd_temperature, cfg.loss_chunk_tokens)(
                    hidden, head, tokens[:, 1:][learned], target
                )[0].item()
            )
    return losses


def _labelled_data(path: Path, reworded: bool = False) -> Path:
    records = [
        {
            "prompt": f"Is {n} even or odd? Answer:",
            "completion": " odd" if n % 2 else " even",
            "choices": [" even", " odd"],
            **(
                {"rewordings": [f"{n}: odd or even?", f"Parity of {n}:"], "unseen_wording": f"Number {n} is"}
                if reworded
                else {}
            ),
        }
        for n in range(40)
    ]
    path.write_text("\n".join(json.dumps(r) for r in records) + "\n")
    return path


def test_examples_train_on_the_answer_and_report_accuracy(tiny_pair, tmp_path):
    from transformers import AutoModelForCausalLM

    from training.data import load_token_data, trimmed
    from training.distill import rows_for_step
    from training.evaluate import predicted_choices
    from training.losses import KDLoss
    from training.teacher import load_causal_lm

    cfg = tiny_config(
        tiny_pair, tmp_path / "adapter", data=str(_labelled_data(tmp_path / "parity.jsonl")), steps=2, eval_samples=8
    )
    report = run_distill(cfg)
    # step 1 starts from B = 0, i.e. the student itself: its loss is KD on the answer tokens of that step's rows only
    teacher, tokenizer, _ = load_causal_lm(cfg.teacher)
    student = AutoModelForCausalLM.from_pretrained(cfg.student)
    data = load_token_data(cfg.data, tokenizer, cfg.seq_len)
    rows = rows_for_step(len(data.train), 0, cfg.batch_size, cfg.seed)
    batch, mask = trimmed(data.train[rows], data.train_mask[rows])
    learned = mask[:, 1:]
    assert learned.sum() == 2 * cfg.batch_size  # " even"/" odd" and EOS, per row
    with torch.no_grad():
        expected, _ = KDLoss(cfg.kd_alpha, cfg.kd_temperature)(
            student(batch).logits[:, :-1][learned], teacher(batch).logits[:, :-1][learned], batch[:, 1:][learned]
        )
    assert report["history"][0]["loss"] == pytest.approx(expected.item(), rel=1e-5)
    # accuracy per rank, for the student alone and for the teacher, from the held-out examples
    meta = load_metadata(cfg.out)
    examples = data.heldout_examples[:8]  # 4: a tenth of 40 is held out

    # (same batches as distill: a tiny random model scores both options nearly equal, so batch numerics could flip a tie)
    def outcomes(predictions):
        return [float(p == e.label) for p, e in zip(predictions, examples)]

    def from_rows(model):  # the student's, from the KL forward: each held-out row's logits after its prompt
        predicted = []
        for start in range(0, len(examples), cfg.batch_size):
            batch, _ = trimmed(
                data.heldout[start : start + cfg.batch_size], data.heldout_mask[start : start + cfg.batch_size]
            )
            with torch.no_grad():
                logits = model(batch).logits
            for row, e in enumerate(examples[start : start + cfg.batch_size]):
                scores = logits[row, len(e.prompt) - 1, [c[0] for c in e.choices]].tolist()
                predicted.append(scores.index(max(scores)))
        return predicted

    teacher_outcomes = outcomes(
        predicted_choices(teacher, examples, cfg.batch_size)
    )  # the teacher's: its prompts alone
    assert meta.teacher_quality.task_outcomes == {"accuracy": teacher_outcomes}
    assert meta.teacher_quality.task_metrics == {"accuracy": sum(teacher_outcomes) / len(examples)}
    assert meta.base_quality.task_outcomes == {"accuracy": outcomes(from_rows(student))}
    assert all(set(r.task_metrics) == {"accuracy"} and len(r.task_outcomes["accuracy"]) == 4 for r in meta.ranks)
    assert "| teacher |" in (cfg.out / "README.md").read_text()
    # the card's prompt format: the first held-out example, as text, and its tokens are the first held-out row's
    assert (
        tokenizer(meta.usage_example.prompt, add_special_tokens=False)["input_ids"] == data.heldout_examples[0].prompt
    )
    assert f"Expected answer: `{meta.usage_example.completion}`" in (cfg.out / "README.md").read_text()


def test_a_full_run_evaluates_in_the_dtype_it_trains_in(tiny_pair, tmp_path):
    """--dtype bf16 (what the quickstart picks on CPUs with native bf16; AVX2-only CPUs run it emulated): the student,
    held in fp32, is evaluated under the same bf16 autocast its steps run in, not in fp32."""
    from training.distill import _evaluate, build_student, load_data, load_teacher

    cfg = tiny_config(tiny_pair, tmp_path / "bf16", train="full", dtype="bf16")
    device = torch.device("cpu")
    student, tokenizer, nested = build_student(cfg, device)
    teacher = load_teacher(cfg, device)[0]
    data = load_data(cfg, tokenizer, 1)
    seen = []
    hook = student.get_output_embeddings().register_forward_hook(lambda module, args, out: seen.append(out.dtype))
    bf16 = _evaluate(cfg, student, nested, teacher, data, tokenizer, [None])[None]
    fp32 = _evaluate(dataclasses.replace(cfg, dtype="fp32"), student, nested, teacher, data, tokenizer, [None])[None]
    hook.remove()
    assert student.dtype == torch.float32 and seen[0] == torch.bfloat16 and seen[-1] == torch.float32
    assert bf16["perplexity"] == pytest.approx(fp32["perplexity"], rel=0.05)


def test_an_adapter_in_bf16_computes_its_lora_in_bf16_and_keeps_fp32_weights(tiny_pair, tmp_path, monkeypatch):
    """--dtype bf16 on an adapter: PEFT keeps the LoRA weights in fp32 (the optimizer's precision), and every LoRA
    matmul, in training steps and in evaluation, runs under bf16 autocast (in fp32 they were ~28% of a pass on an
    AVX512-BF16 CPU). --dtype fp32 computes them in fp32."""
    import training.distill

    seen, build_student = {}, training.distill.build_student

    def build_and_watch(cfg, device):
        student, tokenizer, nested = build_student(cfg, device)
        lora_a = next(m for name, m in student.named_modules() if name.endswith("lora_A.default"))
        lora_a.register_forward_hook(
            lambda module, args, out: seen[cfg.dtype].append((module.weight.dtype, out.dtype, module.training))
        )
        return student, tokenizer, nested

    monkeypatch.setattr(training.distill, "build_student", build_and_watch)
    for dtype, computed in (("bf16", torch.bfloat16), ("fp32", torch.float32)):
        seen[dtype] = []
        run_distill(tiny_config(tiny_pair, tmp_path / dtype, steps=2, eval_ranks=(8,), dtype=dtype))
        assert {training for *_, training in seen[dtype]} == {True, False}  # steps and evaluation both seen
        assert {(weight, out) for weight, out, _ in seen[dtype]} == {(torch.float32, computed)}


def test_a_cpu_computing_in_bf16_attends_eagerly(tiny_pair, tmp_path):
    """On a CPU in bf16 student and teacher load with eager attention (PyTorch's CPU flash-attention kernel is
    1.2x slower per step there), in fp32 with transformers' default SDPA (faster there); GPUs keep the default."""
    from training.distill import build_student, load_teacher
    from training.teacher import attention_kernel

    cpu = torch.device("cpu")
    for dtype, kernel in (("bf16", "eager"), ("fp32", "sdpa")):
        cfg = tiny_config(tiny_pair, tmp_path / dtype, dtype=dtype)
        student, teacher = build_student(cfg, cpu)[0], load_teacher(cfg, cpu)[0]
        assert student.config._attn_implementation == kernel == teacher.config._attn_implementation
    assert attention_kernel(torch.device("cuda"), torch.bfloat16) is None


def test_the_teacher_is_measured_once(tiny_pair, tmp_path, monkeypatch):
    """A full run's report has no row for the teacher's own scores (an adapter's kdlora.json has), so it spends no
    evaluation on them: a task teacher (the teacher fine-tuned on labels) is measured once before training, as the
    student alone, and once after. An adapter distilled from it on the same articles takes the teacher's scores from
    that last measurement (the quickstart's path); on other articles it measures them itself."""
    from training.evaluate import choice_accuracy

    def no_teacher_evaluation(*args, **kwargs):
        raise AssertionError("the teacher was evaluated on its own")

    cfg = tiny_config(
        (tiny_pair[0], tiny_pair[0]),
        tmp_path / "task-teacher",
        train="full",
        kd_alpha=0.0,
        data=str(_labelled_data(tmp_path / "parity.jsonl")),
        steps=1,
        eval_samples=8,
    )
    monkeypatch.setattr("training.evaluate.choice_accuracy", no_teacher_evaluation)  # one-token options: KL forward
    report = run_distill(cfg)
    assert report["before"]["kl_to_teacher"] == pytest.approx(0, abs=1e-6)  # the student is the teacher
    assert len(report["before"]["task_outcomes"]["accuracy"]) == 4
    adapter = dataclasses.replace(
        cfg, student=str(tiny_pair[1]), teacher=str(cfg.out), out=tmp_path / "a", train="qdylora", kd_alpha=0.5
    )
    run_distill(adapter)  # choice_accuracy still raises: the teacher's scores are its report's
    assert load_metadata(adapter.out).teacher_quality.task_outcomes == report["after"]["None"]["task_outcomes"]
    monkeypatch.setattr("training.evaluate.choice_accuracy", choice_accuracy)
    elsewhere = dataclasses.replace(adapter, out=tmp_path / "b", eval_samples=2)  # not the articles it measured
    run_distill(elsewhere)
    assert len(load_metadata(elsewhere.out).teacher_quality.task_outcomes["accuracy"]) == 2


def test_full_training_can_skip_the_evaluation_before(tiny_pair, tmp_path, monkeypatch):
    """--no-evaluate-before (the quickstart's task teacher, whose zero-shot scores nothing reads): one evaluation,
    after training; the report says `before` was not measured."""
    import training.distill

    evaluated = []
    evaluate = training.distill._evaluate
    monkeypatch.setattr(training.distill, "_evaluate", lambda *args: evaluated.append(args[-1]) or evaluate(*args))
    report = run_distill(tiny_config(tiny_pair, tmp_path / "out", train="full", steps=1, evaluate_before=False))
    assert evaluated == [[None]] and report["before"] is None and "kl_to_teacher" in report["after"]["None"]


def test_reworded_examples_train_in_each_wording_and_report_the_unseen_one(tiny_pair, tmp_path):
    from transformers import AutoModelForCausalLM

    from training.data import load_token_data, trimmed
    from training.distill import rows_for_step
    from training.evaluate import UNSEEN_WORDING_ACCURACY, predicted_choices
    from training.losses import KDLoss
    from training.teacher import load_causal_lm

    data_path = _labelled_data(tmp_path / "parity.jsonl", reworded=True)
    cfg = tiny_config(tiny_pair, tmp_path / "adapter", data=str(data_path), steps=2, eval_samples=8)
    report = run_distill(cfg)
    teacher, tokenizer, _ = load_causal_lm(cfg.teacher)
    data = load_token_data(cfg.data, tokenizer, cfg.seq_len)
    assert data.train_wordings.shape == (3, 36, cfg.seq_len) and torch.equal(data.train_wordings[0], data.train)
    # each step's rows are drawn in a wording of their own, a pure function of (seed, step): step 1 trained on these
    rows = rows_for_step(len(data.train), 0, cfg.batch_size, cfg.seed)
    batch, mask = trimmed(*data.train_rows(rows, 0, cfg.seed))
    assert torch.equal(batch, trimmed(*data.train_rows(rows, 0, cfg.seed))[0])
    learned = mask[:, 1:]
    student = AutoModelForCausalLM.from_pretrained(cfg.student)
    with torch.no_grad():
        expected, _ = KDLoss(cfg.kd_alpha, cfg.kd_temperature)(
            student(batch).logits[:, :-1][learned], teacher(batch).logits[:, :-1][learned], batch[:, 1:][learned]
        )
    assert report["history"][0]["loss"] == pytest.approx(expected.item(), rel=1e-5)
    drawn = {tuple(data.train_rows([0], step, cfg.seed)[0][0].tolist()) for step in range(30)}
    assert drawn == {tuple(data.train_wordings[w, 0].tolist()) for w in range(3)}  # every wording, none other
    # the unseen wording: asked of the held-out examples, for every rank, the student alone and the teacher
    meta = load_metadata(cfg.out)
    unseen = data.unseen_examples[:8]
    assert tokenizer.decode(unseen[0].prompt).startswith("Number ") and len(unseen) == 4
    teacher_scores = [float(p == e.label) for p, e in zip(predicted_choices(teacher, unseen, cfg.batch_size), unseen)]
    assert meta.teacher_quality.task_outcomes[UNSEEN_WORDING_ACCURACY] == teacher_scores
    for quality in [meta.base_quality, *meta.ranks]:
        assert set(quality.task_metrics) == {"accuracy", UNSEEN_WORDING_ACCURACY}
        assert len(quality.task_outcomes[UNSEEN_WORDING_ACCURACY]) == 4
    assert "accuracy_unseen_wording" in (cfg.out / "README.md").read_text()
    with pytest.raises(
        KdloraError,
        match=r"^--teacher-cache holds the teacher's targets for each row in one wording, and data .*parity.jsonl "
        r"trains each row in 3 wordings; drop --teacher-cache \(the teacher then runs online\)$",
    ):
        run_distill(dataclasses.replace(cfg, out=tmp_path / "cached", teacher_cache=str(tmp_path / "cache")))


def test_kd_alpha_zero_is_plain_fine_tuning(tiny_pair, tmp_path):
    report = run_distill(
        tiny_config(
            tiny_pair,
            tmp_path / "tuned",
            train="full",
            kd_alpha=0.0,
            steps=2,
            data=str(_labelled_data(tmp_path / "parity.jsonl")),
        )
    )
    assert [set(h) - {"step", "ranks", "seconds"} for h in report["history"]] == [{"loss", "ce"}] * 2
    assert all(h["loss"] == h["ce"] for h in report["history"])


def test_the_chunked_loss_soft_caps_gemma2_and_refuses_other_post_processed_logits():
    """Gemma 2 soft-caps its logits after the LM head: the chunked loss must apply the same cap (a run on head(hidden)
    would train on other numbers); a model that changes its logits in a way kdlora does not know is refused."""
    from transformers import Gemma2Config, Gemma2ForCausalLM

    from training.losses import check_head_split, final_hidden_states

    ids = torch.randint(0, 64, (1, 6))
    llama = tiny_llama()
    check_head_split(llama, ids)  # a plain head: accepted, and the swap is undone
    with final_hidden_states(llama) as head:
        assert llama(ids).logits.shape[-1] == 32 and isinstance(head, torch.nn.Linear)
    assert llama(ids).logits.shape[-1] == 128
    gemma = Gemma2ForCausalLM(
        Gemma2Config(
            vocab_size=64,
            hidden_size=16,
            intermediate_size=32,
            num_hidden_layers=1,
            num_attention_heads=2,
            num_key_value_heads=1,
            head_dim=8,
            final_logit_softcapping=0.5,  # small: every logit is capped (the real 30.0 caps only large ones)
        )
    ).eval()
    with torch.no_grad():
        logits = gemma(ids).logits
        with final_hidden_states(gemma) as head:
            torch.testing.assert_close(head(gemma(ids).logits), logits, rtol=1e-6, atol=1e-6)
        assert logits.abs().max() < 0.5 and gemma.config.final_logit_softcapping == 0.5  # the cap is back
    check_head_split(gemma, ids)

    class LogSoftmaxed(type(llama)):
        def forward(self, *args, **kwargs):
            out = super().forward(*args, **kwargs)
            out.logits = out.logits.log_softmax(-1)
            return out

    scaled = LogSoftmaxed(llama.config).eval()
    with pytest.raises(
        KdloraError,
        match=r"^LogSoftmaxed's logits are not its LM head applied to its final hidden states \(the "
        r"model post-processes them\); kdlora's chunked distillation loss does not support it$",
    ):
        check_head_split(scaled, ids)
