"""Push/pull through the real `huggingface_hub` client against tests/hf_server.py (a fake Hub on
127.0.0.1: the real Hub cannot be reached from here), and through a local directory hub."""

import json
import os

import pytest
import torch
from conftest import kdlora_cli, peft_logits, reference_logits, tiny_input, tiny_llama, write_nested_adapter
from hf_server import point_client_at, serve_fake_hub
from huggingface_hub import ModelCard
from safetensors.torch import load_file

from hub.adapter import ADAPTER_WEIGHTS, read_adapter
from hub.errors import KdloraError
from hub.remote import parse_repo, pull_adapter, push, read_remote_metadata
from hub.schema import load_metadata
from kdlora_serve.serve import free_port

TOKEN = "hf_kdlora_test_token"
INPUT = tiny_input()


@pytest.fixture
def fake_hub(monkeypatch, tmp_path):
    with serve_fake_hub(token=TOKEN) as (url, hub):
        point_client_at(monkeypatch, url, tmp_path / "hf_home")
        monkeypatch.setenv("HF_TOKEN", TOKEN)  # the CLI subprocesses' credential
        yield url, hub


@pytest.fixture
def base():
    return tiny_llama()


@pytest.fixture
def adapter(tmp_path, base):
    return write_nested_adapter(tmp_path / "adapter", base, rank=8)


@pytest.fixture
def student(tmp_path, base):
    base.save_pretrained(tmp_path / "student")
    (tmp_path / "student" / "pruning_report.json").write_text(
        json.dumps({"teacher": "HuggingFaceTB/SmolLM2-135M-Instruct", "params_after": 1234})
    )
    return tmp_path / "student"


def test_round_trip_push_pull_truncate_peft(fake_hub, adapter, student, base, tmp_path):
    url, hub = fake_hub
    pushed = kdlora_cli(
        "hub",
        "push",
        str(adapter),
        "--repo",
        "kd/tiny-adapter",
        "--student",
        str(student),
        "--student-repo",
        "kd/tiny-student",
        "--materialize-ranks",
        "2,4",
    )
    assert pushed.returncode == 0, pushed.stderr
    # one commit per repo (after the Hub's own .gitattributes commit)
    assert len(hub.commits("kd/tiny-student")) == 2 and len(hub.commits("kd/tiny-adapter")) == 2
    files = hub.files("kd/tiny-adapter")
    assert {
        "adapter_config.json",
        "adapter_model.safetensors",
        "kdlora.json",
        "README.md",
        "quality_vs_rank.png",
        "r2/adapter_model.safetensors",
        "r4/kdlora.json",
    } <= set(files)
    assert {"config.json", "model.safetensors", "README.md", "pruning_report.json"} <= set(hub.files("kd/tiny-student"))

    # lineage: adapter -> student (pinned to the student's commit) -> teacher
    meta = json.loads(files["kdlora.json"])
    assert meta["base_model"] == {"id": "kd/tiny-student", "revision": hub.commits("kd/tiny-student")[-1]}
    student_card = ModelCard(hub.files("kd/tiny-student")["README.md"].decode())
    assert student_card.data.base_model == "HuggingFaceTB/SmolLM2-135M-Instruct"
    card = ModelCard(files["README.md"].decode())
    assert card.data.base_model == "kd/tiny-student" and card.data.library_name == "peft" and "kdlora" in card.data.tags
    kl = {r.metric_config: r.metric_value for r in card.data.eval_results if r.metric_type == "kl_divergence"}
    assert kl == {f"rank={r['rank']}": r["kl_to_teacher"] for r in meta["ranks"]}

    pulled = kdlora_cli("hub", "pull", "kd/tiny-adapter", "--out", str(tmp_path / "pulled"), "--rank", "3")
    assert pulled.returncode == 0, pulled.stderr
    assert load_metadata(tmp_path / "pulled").max_rank == 3
    torch.testing.assert_close(peft_logits(base, tmp_path / "pulled", INPUT), reference_logits(base, adapter, 3, INPUT))

    # the pre-truncated folder is a plain PEFT adapter equal to kdlora's own truncation
    r4 = tmp_path / "r4-from-hub"
    r4.mkdir()
    for name in ("adapter_config.json", "adapter_model.safetensors"):
        (r4 / name).write_bytes(files[f"r4/{name}"])
    torch.testing.assert_close(peft_logits(base, r4, INPUT), reference_logits(base, adapter, 4, INPUT))


def test_pull_full_adapter_is_byte_identical(fake_hub, adapter, tmp_path):
    push(adapter, "kd/a", token=TOKEN)
    out = pull_adapter("kd/a", tmp_path / "pulled")
    assert (out / ADAPTER_WEIGHTS).read_bytes() == (adapter / ADAPTER_WEIGHTS).read_bytes()
    assert {p.name for p in out.iterdir()} == {
        "adapter_config.json",
        "adapter_model.safetensors",
        "kdlora.json",
        "README.md",
        "quality_vs_rank.png",
    }


def test_pull_at_a_revision_and_stale_rank_folders_removed(fake_hub, adapter, tmp_path):
    url, hub = fake_hub
    push(adapter, "kd/a", materialize_ranks=[2, 4], token=TOKEN)
    first = hub.commits("kd/a")[-1]
    meta = json.loads((adapter / "kdlora.json").read_text())
    meta["default_rank"] = 8
    (adapter / "kdlora.json").write_text(json.dumps(meta))
    push(adapter, "kd/a", materialize_ranks=[4], token=TOKEN)
    assert not any(f.startswith("r2/") for f in hub.files("kd/a"))  # a re-push replaces the rank folders
    assert read_remote_metadata("kd/a")[0].default_rank == 8
    assert pull_adapter(f"kd/a@{first}", tmp_path / "old") and load_metadata(tmp_path / "old").default_rank == 4


def test_failed_push_leaves_no_repo(fake_hub, adapter):
    url, hub = fake_hub
    hub.fail_next_commit = True
    with pytest.raises(KdloraError, match=r"the Hub at .* answered HTTP 500 for kd/a"):
        push(adapter, "kd/a", token=TOKEN)
    assert "kd/a" not in hub.repo_ids()


def test_failed_push_to_existing_repo_changes_nothing(fake_hub, adapter):
    url, hub = fake_hub
    push(adapter, "kd/a", token=TOKEN)
    before = hub.files("kd/a")
    hub.fail_next_commit = True
    with pytest.raises(KdloraError):
        push(adapter, "kd/a", materialize_ranks=[2], token=TOKEN)
    assert hub.files("kd/a") == before


def test_push_without_token_is_refused(fake_hub, adapter, monkeypatch):
    monkeypatch.delenv("HF_TOKEN")
    result = kdlora_cli("hub", "push", str(adapter), "--repo", "kd/a")
    assert result.returncode == 1
    assert result.stderr.startswith("kdlora: error: the Hub at http://127.0.0.1:")
    assert "answered HTTP 401 for kd/a" in result.stderr and "check HF_TOKEN" in result.stderr


def _commit_raw(hub, repo, files):
    hub.create_repo(repo)
    hub.commit(repo, files)


def test_pull_refuses_pickle_only_repo_without_downloading_it(fake_hub, adapter, tmp_path):
    url, hub = fake_hub
    _commit_raw(
        hub,
        "kd/pickled",
        {
            "adapter_config.json": (adapter / "adapter_config.json").read_bytes(),
            "kdlora.json": (adapter / "kdlora.json").read_bytes(),
            "adapter_model.bin": b"\x80\x04evil",
        },
    )
    with pytest.raises(KdloraError, match=r"refusing pickled weight file\(s\) adapter_model.bin"):
        pull_adapter("kd/pickled", tmp_path / "out")
    assert "adapter_model.bin" not in hub.fetched_files("kd/pickled") + hub.fetched_files("kd/pickled", method="HEAD")
    assert not (tmp_path / "out").exists()


def test_pickles_beside_safetensors_are_never_fetched(fake_hub, adapter, tmp_path):
    url, hub = fake_hub
    _commit_raw(
        hub,
        "kd/mixed",
        {
            **{p.name: p.read_bytes() for p in adapter.iterdir()},
            "adapter_model.bin": b"\x80\x04evil",
            "training_args.pt": b"x",
        },
    )
    pull_adapter("kd/mixed", tmp_path / "out")
    fetched = hub.fetched_files("kd/mixed") + hub.fetched_files("kd/mixed", method="HEAD")
    assert not [f for f in fetched if f.endswith((".bin", ".pt"))]


def test_missing_file_in_repo(fake_hub, adapter, tmp_path):
    url, hub = fake_hub
    _commit_raw(hub, "kd/plain", {p.name: p.read_bytes() for p in adapter.iterdir() if p.name != "kdlora.json"})
    with pytest.raises(
        KdloraError, match=r"repo kd/plain has no kdlora.json \(missing file\): it is not a kdlora adapter repo"
    ):
        pull_adapter("kd/plain", tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_shapes_disagreeing_with_metadata_on_the_hub(fake_hub, adapter, tmp_path):
    url, hub = fake_hub
    files = {p.name: p.read_bytes() for p in adapter.iterdir()}
    meta = json.loads(files["kdlora.json"])
    meta["max_rank"] = 16
    files["kdlora.json"] = json.dumps(meta).encode()
    _commit_raw(hub, "kd/bad", files)
    with pytest.raises(KdloraError, match="says max_rank 16 but the tensors have rank 8"):
        pull_adapter("kd/bad", tmp_path / "out")
    assert not (tmp_path / "out").exists() and not list(tmp_path.glob(".kdlora-pull-*"))  # no out, no staging left


def test_unknown_repo_and_revision(fake_hub, adapter, tmp_path):
    with pytest.raises(
        KdloraError, match=r"repo kd/nope not found on http://127.0.0.1:\d+ \(if it is private, set HF_TOKEN\)"
    ):
        pull_adapter("kd/nope", tmp_path / "out")
    push(adapter, "kd/a", token=TOKEN)
    with pytest.raises(KdloraError, match=r"repo kd/a has no revision '0{40}'"):
        pull_adapter("kd/a@" + "0" * 40, tmp_path / "out")


def test_private_push(fake_hub, adapter, tmp_path):
    url, hub = fake_hub
    push(adapter, "kd/secret", private=True, token=TOKEN)
    with pytest.raises(KdloraError, match=r"repo kd/secret not found on .* \(if it is private, set HF_TOKEN\)"):
        pull_adapter("kd/secret", tmp_path / "anonymous", token=False)
    assert read_adapter(pull_adapter("kd/secret", tmp_path / "out", token=TOKEN)).metadata.max_rank == 8


@pytest.mark.parametrize("spec", ["kd/../etc", "a/b/c", "kd/--x", "just-a-name", "kd/a b"])
def test_bad_repo_ids(spec):
    with pytest.raises(KdloraError, match=rf"'{spec}' is not a valid repo: use ORG/NAME\[@REVISION\]"):
        parse_repo(spec)


def test_absolute_path_is_not_a_repo_id_where_paths_are_not_allowed():
    with pytest.raises(KdloraError, match="'/etc/passwd' is a local path, not a repo id"):
        parse_repo("/etc/passwd", allow_local=False)


def test_unreachable_endpoint(adapter, tmp_path):
    port = free_port()
    result = kdlora_cli("hub", "pull", "kd/a", "--out", str(tmp_path / "out"), "--endpoint", f"http://127.0.0.1:{port}")
    assert result.returncode == 1
    assert result.stderr.startswith(f"kdlora: error: cannot reach the Hub at http://127.0.0.1:{port} (ConnectError")
    assert "use a local directory hub" in result.stderr
    assert not (tmp_path / "out").exists()


def test_pull_into_non_empty_out(adapter, tmp_path):
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "keep").write_text("k")
    with pytest.raises(KdloraError, match="exists and is not empty"):
        pull_adapter(str(adapter), tmp_path / "out")
    assert os.listdir(tmp_path / "out") == ["keep"]


def test_local_directory_hub(adapter, student, base, tmp_path):
    hub_root = tmp_path / "hub"
    landed = push(
        adapter,
        str(hub_root / "kd" / "tiny"),
        student=student,
        student_repo=f"file://{hub_root}/kd/tiny-student",
        materialize_ranks=[2],
    )
    assert landed == [f"file://{hub_root}/kd/tiny-student", f"file://{hub_root}/kd/tiny"]
    assert (hub_root / "kd" / "tiny" / "r2" / "adapter_model.safetensors").is_file()
    assert (hub_root / "kd" / "tiny-student" / "README.md").is_file()
    inspected = kdlora_cli("hub", "inspect", f"file://{hub_root}/kd/tiny")
    assert inspected.returncode == 0, inspected.stderr
    assert f"base       {hub_root}/kd/tiny-student" in inspected.stdout  # loadable: the local hub's path
    assert "| 4 (default) | 0.25 | 0.7 | – | 0.4 |" in inspected.stdout  # KL, agreement, perplexity, greedy_token_f1
    assert "greedy_token_f1" in (hub_root / "kd" / "tiny" / "README.md").read_text()  # card: table and model-index
    truncated = kdlora_cli(
        "hub", "truncate", f"file://{hub_root}/kd/tiny", "--rank", "5", "--out", str(tmp_path / "r5")
    )
    assert truncated.returncode == 0, truncated.stderr
    torch.testing.assert_close(peft_logits(base, tmp_path / "r5", INPUT), reference_logits(base, adapter, 5, INPUT))
    pulled = pull_adapter(f"file://{hub_root}/kd/tiny", tmp_path / "pulled")
    assert load_file(pulled / ADAPTER_WEIGHTS).keys() == load_file(adapter / ADAPTER_WEIGHTS).keys()
