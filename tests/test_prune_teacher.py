"""Pruning the real embedded teacher to ~50%: a checkpoint transformers and vLLM load, with an honest report."""

import json
import subprocess
import sys

import pytest
import torch
from transformers import AutoModelForCausalLM

from hub.remote import PRUNING_REPORT

pytestmark = pytest.mark.integration


def test_report_shows_params_and_perplexities(pruned_student):
    report = json.loads((pruned_student / PRUNING_REPORT).read_text())
    assert report["teacher"] == "HuggingFaceTB/SmolLM2-135M-Instruct"
    assert report["params_before"] == 134_515_008
    assert 0.45 <= report["params_after"] / report["params_before"] <= 0.5
    assert report["student_shape"]["num_hidden_layers"] == 30 and report["student_shape"]["hidden_size"] < 576
    assert len(report["removed"]["hidden_channels"]) == 576 - report["student_shape"]["hidden_size"]
    ppl = report["heldout_perplexity"]
    assert 1 < ppl["teacher"] < 100 and ppl["student"] > ppl["teacher"]  # recovery is distillation's job
    assert (
        (pruned_student / "README.md").read_text().startswith("---\nbase_model: HuggingFaceTB/SmolLM2-135M-Instruct\n")
    )


def test_transformers_loads_the_student(pruned_student):
    model = AutoModelForCausalLM.from_pretrained(pruned_student, dtype=torch.float32)
    report = json.loads((pruned_student / PRUNING_REPORT).read_text())
    assert model.num_parameters() == report["params_after"]
    assert {"tokenizer.json", "chat_template.jinja", "model.safetensors"} <= {p.name for p in pruned_student.iterdir()}


GENERATE = """
import sys
from kdlora_serve.engine import engine_defaults
import os
engine = engine_defaults()
os.environ.update(engine.env)
from vllm import LLM, SamplingParams
if __name__ == "__main__":
    llm = LLM(model=sys.argv[1], max_model_len=512, **engine.llm_kwargs)
    out = llm.generate(["The Python language"], SamplingParams(temperature=0, max_tokens=8))
    print("TOKENS", len(out[0].outputs[0].token_ids))
"""


def test_vllm_loads_and_generates_from_the_student(pruned_student):
    result = subprocess.run(
        [sys.executable, "-c", GENERATE, str(pruned_student)], capture_output=True, text=True, timeout=600
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "TOKENS 8" in result.stdout
