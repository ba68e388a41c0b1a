"""Exact truncation: PEFT on the rank-k file computes what the rank-R adapter computes with only its
first k rank components at scale alpha/k (DyLoRA's rule), for every module kind PEFT writes."""

import json

import pytest
import torch
from conftest import kdlora_cli, peft_logits, reference_logits, tiny_input, tiny_llama, write_nested_adapter
from safetensors.torch import load_file

from hub.adapter import ADAPTER_CONFIG, ADAPTER_WEIGHTS, read_adapter, truncate_adapter
from hub.errors import KdloraError
from hub.schema import load_metadata

INPUT = tiny_input()

VARIANTS = {
    "linear": {},
    "rank_and_alpha_patterns": {
        "rank_pattern": {"v_proj": 4, "layers.1.mlp.down_proj": 2},
        "alpha_pattern": {"o_proj": 3},
    },
    "embedding": {"target_modules": ["embed_tokens", "q_proj", "v_proj"]},
}


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("rank", [1, 3, 8])
def test_truncated_adapter_equals_prefix_of_full(tmp_path, variant, rank):
    base = tiny_llama()
    full = write_nested_adapter(tmp_path / "full", base, rank=8, **VARIANTS[variant])
    cut = truncate_adapter(full, rank, tmp_path / f"r{rank}")
    expected = reference_logits(base, full, rank, INPUT)
    got = peft_logits(base, cut, INPUT)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    if rank < 8:  # and the truncation really changed the model
        assert not torch.allclose(got, peft_logits(base, full, INPUT), atol=1e-3)


def test_truncation_keeps_dtype_and_rewrites_metadata(tmp_path):
    full = write_nested_adapter(tmp_path / "full", tiny_llama(), rank=8, dtype=torch.bfloat16)
    cut = truncate_adapter(full, 2, tmp_path / "r2")
    tensors = load_file(cut / ADAPTER_WEIGHTS)
    assert {t.dtype for t in tensors.values()} == {torch.bfloat16}
    assert all(t.shape[0] == 2 for name, t in tensors.items() if "lora_A" in name)
    config = json.loads((cut / ADAPTER_CONFIG).read_text())
    assert (config["r"], config["lora_alpha"]) == (2, 16)
    meta = load_metadata(cut)
    assert (meta.max_rank, meta.default_rank, meta.truncated_from) == (2, 2, 8)
    assert [r.rank for r in meta.ranks] == [1, 2]
    assert read_adapter(cut).module_ranks  # the result is itself a valid nested adapter


@pytest.mark.integration
def test_truncation_is_exact_on_the_embedded_teacher(tmp_path, teacher_dir):
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(teacher_dir, dtype=torch.float32).eval()
    full = write_nested_adapter(tmp_path / "full", base, rank=16, alpha=32)
    ids = torch.randint(0, base.config.vocab_size, (1, 16), generator=torch.Generator().manual_seed(0))
    full_logits = peft_logits(base, full, ids)
    for rank in (1, 4, 16):
        cut = truncate_adapter(full, rank, tmp_path / f"r{rank}")
        got, expected = peft_logits(base, cut, ids), reference_logits(base, full, rank, ids)
        # 30 fp32 layers with a large random adapter: the k-term and the zero-padded R-term matmuls sum in
        # different orders, ~1e-3 apart on logits of magnitude ~20; a wrong truncation is off by O(1).
        torch.testing.assert_close(got, expected, rtol=1e-3, atol=5e-3)
        if rank < 16:
            assert (got - full_logits).abs().max() > 0.5


# --- bad input: a clear one-line error, non-zero exit, nothing written -------------------------------


@pytest.fixture
def nested(tmp_path):
    return write_nested_adapter(tmp_path / "full", tiny_llama(), rank=8)


def _truncate_cli(src, rank, out):
    return kdlora_cli("hub", "truncate", str(src), "--rank", str(rank), "--out", str(out))


@pytest.mark.parametrize("rank", ["0", "-1", "9"])
def test_rank_out_of_range(nested, tmp_path, rank):
    result = _truncate_cli(nested, rank, tmp_path / "out")
    assert result.returncode == 1
    assert result.stderr == f"kdlora: error: rank {rank} is out of range: this adapter has ranks 1..8\n"
    assert not (tmp_path / "out").exists()


def test_cli_truncate_writes_the_adapter(nested, tmp_path):
    result = _truncate_cli(nested, "4", tmp_path / "out")
    assert result.returncode == 0, result.stderr
    assert load_metadata(tmp_path / "out").max_rank == 4


def test_plain_peft_adapter_is_not_nested(nested, tmp_path):
    (nested / "kdlora.json").unlink()
    result = _truncate_cli(nested, "4", tmp_path / "out")
    assert result.returncode == 1
    assert result.stderr.startswith(
        f"kdlora: error: {nested} has no kdlora.json: it is not a kdlora nested-rank adapter"
    )
    assert "kdlora distill --train qdylora" in result.stderr
    assert not (tmp_path / "out").exists()


def test_malformed_metadata_json(nested, tmp_path):
    (nested / "kdlora.json").write_text('{"max_rank": 8,')
    with pytest.raises(
        KdloraError,
        match=r"kdlora.json is not valid JSON \(Expecting property name enclosed in double quotes at line 1, column 16\)",
    ):
        truncate_adapter(nested, 2, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_invalid_metadata_names_the_field(nested, tmp_path):
    meta = json.loads((nested / "kdlora.json").read_text())
    meta["ranks"][0]["teacher_top1_agreement"] = 1.5
    (nested / "kdlora.json").write_text(json.dumps(meta))
    with pytest.raises(
        KdloraError, match=r"field 'ranks.0.teacher_top1_agreement': Input should be less than or equal to 1"
    ):
        read_adapter(nested)


@pytest.mark.parametrize("version", [2, "2.0"])
def test_newer_major_schema_version_says_upgrade(nested, version):
    meta = json.loads((nested / "kdlora.json").read_text())
    meta["schema_version"] = version
    (nested / "kdlora.json").write_text(json.dumps(meta))
    with pytest.raises(
        KdloraError,
        match=r"field 'schema_version' is 2(\.0)?, a newer major version than this kdlora understands \(1\.4\); upgrade kdlora",
    ):
        read_adapter(nested)


@pytest.mark.parametrize("version", [1, "1.0", "1.1", "1.2", "1.3", "1.4", "1.9"])
def test_same_major_schema_reads_and_ignores_fields_it_does_not_know(nested, version, tmp_path):
    meta = json.loads((nested / "kdlora.json").read_text())
    meta |= {"schema_version": version, "added_later": {"x": 1}}
    meta["ranks"][0]["energy_joules"] = 3.5  # a field a newer minor version may add, nested
    meta["recipe"] = {"method": "kd-qdylora", "schedule": "sandwich"}
    (nested / "kdlora.json").write_text(json.dumps(meta))
    read = read_adapter(nested).metadata
    assert read.ranks[0].kl_to_teacher == meta["ranks"][0]["kl_to_teacher"] and read.recipe.method == "kd-qdylora"
    saved = json.loads(read.save(tmp_path).read_text())  # this kdlora writes its own version and fields only
    assert saved["schema_version"] == "1.4" and "added_later" not in saved and "energy_joules" not in saved["ranks"][0]


def test_writers_stay_strict():
    from pydantic import ValidationError

    from hub.schema import RankResult

    with pytest.raises(ValidationError, match="rnk"):
        RankResult(rank=2, rnk=3)


def test_shapes_disagreeing_with_metadata(nested, tmp_path):
    meta = json.loads((nested / "kdlora.json").read_text())
    meta["max_rank"] = 16
    (nested / "kdlora.json").write_text(json.dumps(meta))
    with pytest.raises(
        KdloraError, match="kdlora.json says max_rank 16 but the tensors have rank 8; the files do not belong together"
    ):
        truncate_adapter(nested, 4, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_config_disagreeing_with_tensors(nested):
    config = json.loads((nested / ADAPTER_CONFIG).read_text())
    config["r"] = 4
    (nested / ADAPTER_CONFIG).write_text(json.dumps(config))
    with pytest.raises(KdloraError, match=r"has rank 8 in adapter_model.safetensors but 4 in adapter_config.json"):
        read_adapter(nested)


def test_dora_is_refused_and_rslora_read(nested):
    config = json.loads((nested / ADAPTER_CONFIG).read_text())
    (nested / ADAPTER_CONFIG).write_text(json.dumps({**config, "use_rslora": True}))
    assert read_adapter(nested).config["use_rslora"]  # alpha/sqrt(r) truncates exactly too (tests/test_distill.py)
    (nested / ADAPTER_CONFIG).write_text(json.dumps({**config, "use_dora": True}))
    with pytest.raises(
        KdloraError, match=r"nested-rank truncation is exact for LoRA and rsLoRA scaling only, not DoRA$"
    ):
        read_adapter(nested)


def test_pickled_weights_are_refused(nested):
    (nested / "adapter_model.bin").write_bytes(b"not loaded")
    with pytest.raises(
        KdloraError, match=r"refusing pickled weight file\(s\) adapter_model.bin: loading a pickle can execute code"
    ):
        read_adapter(nested)


def test_existing_non_empty_out(nested, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep").write_text("k")
    result = _truncate_cli(nested, "2", out)
    assert result.returncode == 1
    assert "exists and is not empty" in result.stderr
    assert [p.name for p in out.iterdir()] == ["keep"]
