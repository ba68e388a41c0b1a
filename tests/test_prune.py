"""Structured pruning: the student is exactly the teacher with the removed units zeroed, and the
units removed are the unimportant ones."""

import json

import pytest
import torch
from conftest import kdlora_cli, kdlora_launch, tiny_input, tiny_llama

from hub.errors import KdloraError
from training.importance import activation_importance
from training.prune import (
    Shape,
    build_student,
    choose_shape,
    count_params,
    head_dim,
    parse_param_count,
    removed_units,
)

CALIB = torch.randint(0, 128, (16, 12), generator=torch.Generator().manual_seed(1))


def zeroed_teacher(teacher, selection):
    """The teacher with every removed unit's contribution set to zero (a copy; any family build_student takes)."""
    model = type(teacher)(teacher.config).eval()
    model.load_state_dict(teacher.state_dict())
    d = head_dim(model.config)
    gone = torch.ones(model.config.hidden_size, dtype=torch.bool)
    gone[selection.channels] = False
    with torch.no_grad():
        model.model.embed_tokens.weight[:, gone] = 0
        for i, layer in enumerate(model.model.layers):
            attn, mlp = layer.self_attn, layer.mlp
            if i not in selection.layers:  # a removed layer adds nothing to the residual stream
                attn.o_proj.weight.zero_()
                mlp.down_proj.weight.zero_()
                continue
            for h in set(range(model.config.num_attention_heads)) - set(selection.q_heads[i]):
                attn.o_proj.weight[:, h * d : (h + 1) * d] = 0
            dead = torch.ones(model.config.intermediate_size, dtype=torch.bool)
            dead[selection.neurons[i]] = False
            mlp.down_proj.weight[:, dead] = 0
            attn.o_proj.weight[gone] = 0
            mlp.down_proj.weight[gone] = 0
    return model


SHAPES = {
    "kv_groups": Shape(32, 2, 1, 64, 2),
    "heads_within_groups": Shape(32, 2, 2, 64, 2),
    "neurons": Shape(32, 4, 2, 40, 2),
    "channels": Shape(20, 4, 2, 64, 2),
    "layers": Shape(32, 4, 2, 64, 1),
    "all_axes": Shape(24, 2, 1, 40, 1),
}


@pytest.mark.parametrize("axis", SHAPES)
def test_student_equals_teacher_with_removed_units_zeroed(axis):
    teacher = tiny_llama()
    importance = activation_importance(teacher, CALIB)
    student, selection = build_student(teacher, importance, SHAPES[axis])
    assert Shape.of(student.config) == SHAPES[axis]
    with torch.no_grad():
        expected = zeroed_teacher(teacher, selection)(tiny_input()).logits
        got = student(tiny_input()).logits
        original = teacher(tiny_input()).logits
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(got, original, atol=1e-3)  # something really was removed


def test_unimportant_units_are_the_ones_removed():
    teacher = tiny_llama()
    d = teacher.config.head_dim
    with torch.no_grad():
        layers = teacher.model.layers
        layers[0].self_attn.o_proj.weight.mul_(1e-3)  # layer 0 barely changes the residual stream
        layers[0].mlp.down_proj.weight.mul_(1e-3)
        layers[1].self_attn.v_proj.weight[d : 2 * d] *= 1e-3  # KV group 1 of layer 1: tiny head outputs
        layers[1].mlp.up_proj.weight[[3, 7, 11]] *= 1e-3  # three near-silent neurons
        for norm in [teacher.model.norm] + [
            n for layer in layers for n in (layer.input_layernorm, layer.post_attention_layernorm)
        ]:
            norm.weight[[5, 9]] = 1e-3  # two channels every norm mutes
    importance = activation_importance(teacher, CALIB)
    _, selection = build_student(teacher, importance, Shape(30, 2, 1, 61, 1))
    removed = removed_units(teacher.config, selection)
    assert removed["layers"] == [0]
    assert removed["kv_heads"] == {"1": [1]}
    assert removed["query_heads"] == {"1": [2, 3]}
    assert removed["hidden_channels"] == [5, 9]
    assert sorted(set(range(64)) - set(selection.neurons[1].tolist())) == [3, 7, 11]


def test_target_params_shrinks_width_to_fit():
    config = tiny_llama().config
    total = count_params(config)
    shape, _ = choose_shape(config, total // 2)
    assert count_params_of(config, shape) <= total // 2
    assert (shape.num_attention_heads, shape.num_hidden_layers) == (4, 2)  # only width moves by default
    assert shape.hidden_size < 32 and shape.intermediate_size < 64
    with_layers, _ = choose_shape(config, total // 2, num_hidden_layers=1)
    assert with_layers.num_hidden_layers == 1 and with_layers.hidden_size > shape.hidden_size


def test_widths_prefer_hardware_friendly_multiples_and_say_why():
    from transformers import LlamaConfig, MistralConfig

    # SmolLM2-135M's shape (built on the meta device only): 9 heads force a Llama hidden size to a multiple of 9,
    # so a multiple of 64 would be lcm(64, 9) = 576, the teacher's own width
    smollm = LlamaConfig(
        vocab_size=49152,
        hidden_size=576,
        intermediate_size=1536,
        num_hidden_layers=30,
        num_attention_heads=9,
        num_key_value_heads=3,
        head_dim=64,
        tie_word_embeddings=True,
    )
    shape, rounding = choose_shape(smollm, count_params(smollm) // 2)
    assert (shape.hidden_size, shape.intermediate_size) == (360, 960)
    assert rounding["intermediate_size"] == {"multiple": 64, "why": "the friendliest width that fits the target"}
    assert rounding["hidden_size"]["multiple"] == 72
    assert rounding["hidden_size"]["why"].startswith(
        "multiples of 576 (lcm with the 9 heads, which transformers requires): none below 576; "
        "multiples of 288: 57.3M params, more than 5% under the target"
    )
    # without that constraint both widths land on multiples of 64
    mistral = MistralConfig(
        vocab_size=32000,
        hidden_size=1024,
        intermediate_size=2816,
        num_hidden_layers=4,
        num_attention_heads=16,
        num_key_value_heads=4,
        head_dim=64,
    )
    shape, rounding = choose_shape(mistral, count_params(mistral) // 2)
    assert shape.hidden_size % 64 == 0 and shape.intermediate_size % 64 == 0 and shape.hidden_size < 1024
    assert {axis: r["multiple"] for axis, r in rounding.items()} == {"hidden_size": 64, "intermediate_size": 64}
    assert count_params_of(mistral, shape) >= 0.95 * (count_params(mistral) // 2)


def count_params_of(config, shape):
    from training.prune import student_config

    return count_params(student_config(config, shape))


def test_param_count_forms():
    assert parse_param_count("0.5", 1000) == 500
    assert parse_param_count("70M", 1) == 70_000_000
    assert parse_param_count("1.5B", 1) == 1_500_000_000
    with pytest.raises(
        KdloraError, match="--target-params 'half' is not a number: use e.g. 70M, 1.5B or a fraction like 0.5"
    ):
        parse_param_count("half", 1)


@pytest.mark.parametrize(
    "dims, message",
    [
        (
            {"num_attention_heads": 3, "num_key_value_heads": 2},
            "--num-heads 3 must be a multiple of --num-kv-heads 2 (grouped-query attention); nearest valid --num-heads: 2 or 4",
        ),
        ({"hidden_size": 64}, "--hidden-size 64 must be between 1 and the teacher's 32"),
        (
            {"hidden_size": 30},
            "--hidden-size 30 must be a multiple of --num-heads 4 for Llama models (transformers requires it); nearest valid --hidden-size: 28 or 32",
        ),
        (
            {"num_attention_heads": 4, "num_key_value_heads": 1},
            "needs 4 query heads per KV group but the teacher has 2; use --num-heads <= 2",
        ),
    ],
)
def test_bad_shapes(dims, message):
    with pytest.raises(KdloraError, match=message.replace("(", r"\(").replace(")", r"\)")):
        choose_shape(tiny_llama().config, **dims)


def test_target_not_smaller_than_teacher():
    config = tiny_llama().config
    with pytest.raises(KdloraError, match=f"--target-params {count_params(config):,} is not below the teacher's"):
        choose_shape(config, count_params(config))


def test_unsupported_architecture(tmp_path):
    from transformers import GPT2Config, GPT2LMHeadModel

    GPT2LMHeadModel(
        GPT2Config(n_layer=1, n_embd=16, n_head=2, vocab_size=64, bos_token_id=0, eos_token_id=0)
    ).save_pretrained(tmp_path / "gpt2")
    result = kdlora_cli(
        "prune", "--teacher", str(tmp_path / "gpt2"), "--out", str(tmp_path / "out"), "--target-params", "0.5"
    )
    assert result.returncode == 1
    assert (
        result.stderr
        == "kdlora: error: pruning gpt2 models is not supported yet; supported: llama, mistral, qwen2, qwen3 (Llama-family decoders)\n"
    )
    assert not (tmp_path / "out").exists()


def test_prune_refuses_non_empty_out(tmp_path):
    (tmp_path / "keep").write_text("k")
    result = kdlora_cli("prune", "--out", str(tmp_path), "--target-params", "0.5")
    assert result.returncode == 1
    assert (
        result.stderr
        == f"kdlora: error: --out {tmp_path} exists and is not empty; choose a new directory or remove it first\n"
    )


def test_two_processes_share_the_calibration_and_prune_the_same_student(tiny_pair, tmp_path):
    """Each process scores its share of the calibration blocks; the gathered importance selects the same units, so
    the student is the one a single process makes."""
    from safetensors.torch import load_file

    teacher = tiny_pair[0]
    prune = (
        "prune",
        "--teacher",
        str(teacher),
        "--intermediate-size",
        "96",
        "--num-heads",
        "2",
        "--calib-samples",
        "12",
        "--seq-len",
        "32",
        "--batch-size",
        "2",
    )
    result = kdlora_launch("ddp.yaml", *prune, "--out", str(tmp_path / "two"))
    assert result.returncode == 0, result.stderr[-4000:]
    assert result.stdout.split() == [str(tmp_path / "two")]  # printed once, by the main process
    assert "importance (calibration): 100%|██████████| 3/3" in result.stderr  # 6 of the 12 blocks each, 2 per batch
    assert kdlora_cli(*prune, "--out", str(tmp_path / "one")).returncode == 0
    reports = [json.loads((tmp_path / out / "pruning_report.json").read_text()) for out in ("two", "one")]
    assert reports[0]["removed"] == reports[1]["removed"]
    assert reports[0]["heldout_perplexity"] == pytest.approx(reports[1]["heldout_perplexity"], rel=1e-6)
    two, one = (load_file(tmp_path / out / "model.safetensors") for out in ("two", "one"))
    assert all(torch.equal(two[name], one[name]) for name in one)
