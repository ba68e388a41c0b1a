"""Structured pruning on every family `kdlora prune` claims (issue 29, first part): tiny random checkpoints shaped
like each family's real configs, the student exactly the teacher with the removed units zeroed. What each family
adds: Llama 3 (GQA 4:1, untied embeddings, llama3 rope scaling), Mistral (untied), Qwen2 (q/k/v biases, tied),
Qwen3 (per-head q/k norms, head_dim twice hidden / heads)."""

import pytest
import torch
from conftest import tiny_input
from test_prune import CALIB, zeroed_teacher
from transformers import (
    LlamaConfig,
    LlamaForCausalLM,
    MistralConfig,
    MistralForCausalLM,
    Qwen2Config,
    Qwen2ForCausalLM,
    Qwen3Config,
    Qwen3ForCausalLM,
)

from hub.errors import KdloraError
from training.importance import activation_importance
from training.prune import Shape, build_student

LLAMA3_ROPE = {
    "rope_type": "llama3",
    "factor": 8.0,
    "low_freq_factor": 1.0,
    "high_freq_factor": 4.0,
    "original_max_position_embeddings": 16,
}
FAMILIES = {  # (model class, config class, what the family's real configs set)
    "llama3": (LlamaForCausalLM, LlamaConfig, dict(num_key_value_heads=1, tie_word_embeddings=False, rope_scaling=LLAMA3_ROPE)),
    "mistral": (MistralForCausalLM, MistralConfig, dict(num_key_value_heads=2, tie_word_embeddings=False)),
    "qwen2": (Qwen2ForCausalLM, Qwen2Config, dict(num_key_value_heads=2, tie_word_embeddings=True)),
    "qwen3": (Qwen3ForCausalLM, Qwen3Config, dict(num_key_value_heads=2, head_dim=16, tie_word_embeddings=True)),
}  # fmt: skip
STUDENT = Shape(24, 2, 1, 40, 1)  # every axis pruned: channels, heads, kv groups, neurons, a layer


def tiny(family: str, seed: int = 0, **sizes):
    """A random `family` model: unit tests' sizes unless `sizes` says otherwise (tests/test_families_e2e.py)."""
    model_class, config_class, special = FAMILIES[family]
    torch.manual_seed(seed)
    settings = dict(
        vocab_size=128,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        max_position_embeddings=64,
    )
    model = model_class(config_class(**{**settings, **special, **sizes})).eval()
    with torch.no_grad():  # random biases and norms (a fresh model has zeros and ones: removing them would not show)
        model.model.embed_tokens.weight.normal_()  # hidden states of unit scale, as in trained models (not 0.02's)
        for name, param in model.named_parameters():
            if name.endswith(("_proj.bias", "q_norm.weight", "k_norm.weight")):
                param.normal_(1.0 if "norm" in name else 0.0, 0.5)
    return model


@pytest.mark.parametrize("family", FAMILIES)
def test_every_family_prunes_to_the_teacher_with_removed_units_zeroed(family):
    teacher = tiny(family)
    student, selection = build_student(teacher, activation_importance(teacher, CALIB), STUDENT)
    assert type(student) is type(teacher) and Shape.of(student.config) == STUDENT
    with torch.no_grad():
        expected = zeroed_teacher(teacher, selection)(tiny_input()).logits
        got = student(tiny_input()).logits
        original = teacher(tiny_input()).logits
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(got, original, atol=1e-3)  # something really was removed


def test_a_qwen2_students_hidden_size_follows_its_heads_for_vllm():
    """vLLM's Qwen2 takes head_dim as hidden / heads (config.head_dim ignored): a student with another hidden size
    would not load there (vLLM 0.32: "start (0) + length (48) exceeds dimension size (32)")."""
    from training.prune import choose_shape

    config = tiny("qwen2").config  # hidden 32, 4 heads of 8
    assert choose_shape(config, None, num_attention_heads=2, num_key_value_heads=1)[0].hidden_size == 16
    assert choose_shape(config, 15_000, num_attention_heads=2, num_key_value_heads=1)[0].hidden_size == 16
    with pytest.raises(KdloraError) as refused:
        choose_shape(config, None, hidden_size=24, num_attention_heads=2, num_key_value_heads=1)
    assert str(refused.value) == (
        "--hidden-size 24 with --num-heads 2: a Qwen2 student needs hidden size = heads x head_dim (16), because "
        "vLLM's Qwen2 ignores config.head_dim; give --hidden-size 16 or leave it out (it follows --num-heads)"
    )
    assert choose_shape(tiny("qwen3").config, None, hidden_size=24, num_attention_heads=2)[0].hidden_size == 24
