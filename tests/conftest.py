"""Shared fixtures. Expensive things exist once per test session: one exported teacher, one vLLM server.

Tiers: tests marked `integration` use the real embedded teacher and/or the real vLLM server; the rest
are fast. `pytest -m "not integration"` runs the fast tier alone; scripts/test runs everything.

scripts/test runs the suite on two pytest-xdist workers: most of it keeps one core busy (Python, process start-ups,
vLLM's imports), so two workers share the 2 cores' time. Each module's tests stay on one worker (module fixtures are
built once), and so do all the modules that use the session server (one server a session) or the pruned student
(pruned once): SHARED_FIXTURE_MODULES.
"""

import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
SERVER_START_TIMEOUT_S = 600
# Under xdist, the modules that use an expensive session fixture run on one worker, so it is built once (checked at
# collection)
SHARED_FIXTURE_MODULES = {
    "vllm_server": {"test_serve.py", "test_serve_budgets.py", "test_teacher.py"},
    "pruned_student": {"test_distill_teacher.py", "test_nf4.py", "test_prune_teacher.py"},
}
# Scheduled first, longest first (~7, 5.5, 4, 3.5, 2.5 min on two workers; pytest prints the 30 slowest tests each
# run): one of them left to the end keeps one worker busy while the other idles
LONG_FIRST = ("vllm_server", "test_families_e2e.py", "pruned_student", "test_lora_triton.py", "test_plan.py")
if os.environ.get("PYTEST_XDIST_WORKER"):
    # two workers on two cores: one thread each (torch's default, one per core, would make four), inherited by the
    # processes tests start; vLLM's engines pick their own threads
    os.environ.setdefault("OMP_NUM_THREADS", "1")


def scope(module: str) -> str:
    """What runs on one xdist worker: a module, or the group of modules that share an expensive fixture."""
    return next((fixture for fixture, modules in SHARED_FIXTURE_MODULES.items() if module in modules), module)


@pytest.hookimpl(optionalhook=True)  # a pytest-xdist hook
def pytest_xdist_make_scheduler(config, log):
    """Each `scope` whole to one worker, in collection order. xdist's `--dist loadgroup` would group with marks, but
    it cannot rename pytest 9.2's node ids; its default order (most tests first) left long modules of few tests last."""
    from xdist.scheduler import LoadScopeScheduling

    class ByScope(LoadScopeScheduling):
        def _split_scope(self, nodeid: str) -> str:
            return scope(Path(nodeid.split("::", 1)[0]).name)

    config.option.loadscopereorder = False
    return ByScope(config, log)


def pytest_collection_modifyitems(items):
    for fixture, modules in SHARED_FIXTURE_MODULES.items():
        stray = {item.path.name for item in items if fixture in item.fixturenames} - modules
        if stray:
            raise pytest.UsageError(
                f"{sorted(stray)} use {fixture}: add them to SHARED_FIXTURE_MODULES (tests/conftest.py)"
            )
    first = {name: i for i, name in enumerate(LONG_FIRST)}
    items.sort(key=lambda item: first.get(scope(item.path.name), len(first)))


def kdlora_cli(*args: str, env: dict | None = None, timeout: float = 600) -> subprocess.CompletedProcess:
    """Run the installed `kdlora` console script as a user would."""
    exe = Path(sys.executable).parent / "kdlora"
    return subprocess.run([str(exe), *args], capture_output=True, text=True, timeout=timeout, env=env, cwd=REPO)


def kdlora_launch(config: str, *args: str, processes: int = 2, timeout: float = 300) -> subprocess.CompletedProcess:
    """`accelerate launch --config_file configs/<config> ... -m kdlora_serve.cli <args>` as users run it: on a machine
    without GPUs kdlora joins the processes over gloo (training/processes.py)."""
    from kdlora_serve.serve import free_port

    cmd = [
        sys.executable,
        "-m",
        "accelerate.commands.launch",
        "--config_file",
        str(REPO / "configs" / config),
        "--num_processes",
        str(processes),
        "--main_process_port",
        str(free_port()),  # not accelerate's fixed default: another xdist worker may be launching too
        "-m",
        "kdlora_serve.cli",
        *args,
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}  # 2 cores: one thread per process
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, cwd=REPO, env=env)


@pytest.fixture(scope="session")
def teacher_dir() -> Path:
    """The real embedded teacher, exported once into the user cache (reused across sessions when valid)."""
    from training.teacher import embedded_teacher

    return embedded_teacher()


@pytest.fixture(scope="session")
def teacher_adapter(teacher_dir, tmp_path_factory) -> Path:
    """A random nested-rank adapter (R=16) on the real teacher, with made-up per-rank metadata."""
    import torch
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(teacher_dir, dtype=torch.float32)
    return write_nested_adapter(
        tmp_path_factory.mktemp("adapters") / "teacher-adapter",
        base,
        rank=16,
        alpha=16,
        base_model_id=str(teacher_dir),
        init_scale=0.5,
    )


@pytest.fixture(scope="session")
def session_hub():
    """One fake Hub (tests/hf_server.py) for the session; the vLLM server pulls from it."""
    from hf_server import serve_fake_hub

    with serve_fake_hub() as (url, hub):
        yield url, hub


@pytest.fixture(scope="session")
def vllm_root(tmp_path_factory) -> Path:
    """The session server's folder: its log is server.log."""
    return tmp_path_factory.mktemp("vllm")


@pytest.fixture(scope="session")
def vllm_server(teacher_adapter, session_hub, vllm_root):
    """One real vLLM server for the whole session, started by `kdlora serve` on 127.0.0.1: the teacher
    as base (served as "teacher"), the adapter as an alias, and repos "kd/*" pullable from the fake Hub."""
    from kdlora_serve.serve import start_background

    url, _ = session_hub
    root = vllm_root
    env = {
        **os.environ,
        "HF_ENDPOINT": url,
        "HF_HUB_DISABLE_XET": "1",
        "HF_HOME": str(root / "hf"),
        "KDLORA_CACHE": str(root / "cache"),
        "VLLM_NO_USAGE_STATS": "1",
        "VLLM_LOGGING_LEVEL": "INFO",
        "KDLORA_ELASTIC": str(root / "elastic-table"),  # kdlora_serve.elastic: where tests can read and lower rows
    }
    env.pop("HF_TOKEN", None)
    args = [
        "--adapter",
        str(teacher_adapter),
        "--allow",
        "kd/*",
        "--max-loras",
        "4",
        "--",
        "--served-model-name",
        "teacher",
        "--dtype",
        "float32",
        "--max-model-len",
        "1024",
    ]
    try:
        proc, base_url = start_background(args, root / "server.log", env=env, timeout_s=SERVER_START_TIMEOUT_S)
    except RuntimeError as err:
        pytest.fail(str(err))
    try:
        yield base_url
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            proc.kill()


def tiny_llama(seed: int = 0):
    """A random Llama small enough for unit tests (same code paths as the real teacher)."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=128,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
        tie_word_embeddings=True,
    )
    return LlamaForCausalLM(config).eval()


def write_nested_adapter(
    out: Path,
    model,
    rank: int = 8,
    alpha: int = 16,
    seed: int = 1,
    dtype=None,
    base_model_id: str = "tiny-llama",
    **lora_kwargs,
) -> Path:
    """A PEFT LoRA with random A and B (so every rank component matters) plus its kdlora.json."""
    import torch
    from peft import LoraConfig, get_peft_model

    from hub.schema import ModelRef, RankMetadata, RankResult

    torch.manual_seed(seed)
    lora_kwargs.setdefault(
        "target_modules", ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    )
    init_scale = lora_kwargs.pop("init_scale", None)
    config = LoraConfig(r=rank, lora_alpha=alpha, init_lora_weights=False, **lora_kwargs)
    peft_model = get_peft_model(model, config)
    if init_scale is not None:  # a gentler random adapter: outputs change with rank but stay text
        with torch.no_grad():
            for name, param in peft_model.named_parameters():
                if "lora_B" in name:
                    param.mul_(init_scale)
    if dtype is not None:
        peft_model = peft_model.to(dtype)
    peft_model.save_pretrained(out)
    peft_model.unload()  # leave `model` as it was, for the caller's reference computations
    ranks = sorted({1, 2, 4, rank} & set(range(1, rank + 1)))
    RankMetadata(
        max_rank=rank,
        default_rank=min(4, rank),
        base_model=ModelRef(id=base_model_id),
        teacher=ModelRef(id="tiny-teacher"),
        ranks=[
            RankResult(
                rank=k,
                kl_to_teacher=1.0 / k,
                teacher_top1_agreement=min(1.0, 0.5 + k / 20),
                adapter_bytes=k * 100,
                task_metrics={"greedy_token_f1": min(1.0, k / 10)},
            )
            for k in ranks
        ],
    ).save(out)
    return Path(out)


def tiny_input():
    """Token ids for the tiny Llama (fixed, so every test compares the same forward)."""
    import torch

    return torch.randint(0, 128, (2, 12), generator=torch.Generator().manual_seed(0))


def reference_logits(base, adapter_dir, rank, input_ids):
    """The full adapter with components >= rank zeroed and every scale set to alpha/min(rank, r_module):
    DyLoRA's rank-k forward, computed without any truncation code."""
    import torch
    from peft import PeftModel

    model = PeftModel.from_pretrained(base, adapter_dir).eval()
    with torch.no_grad():
        for module in model.modules():
            if not hasattr(module, "lora_A") or "default" not in module.r:
                continue
            k = min(rank, module.r["default"])
            if "default" in module.lora_A:
                module.lora_A["default"].weight[k:] = 0
                module.lora_B["default"].weight[:, k:] = 0
            else:
                module.lora_embedding_A["default"][k:] = 0
                module.lora_embedding_B["default"][:, k:] = 0
            module.scaling["default"] = module.lora_alpha["default"] / k
        logits = model(input_ids).logits
    model.unload()
    return logits


def peft_logits(base, adapter_dir, input_ids):
    """Logits of `base` with the adapter in `adapter_dir` loaded by PEFT as it is."""
    import torch
    from peft import PeftModel

    model = PeftModel.from_pretrained(base, adapter_dir).eval()
    with torch.no_grad():
        logits = model(input_ids).logits
    model.unload()
    return logits


@pytest.fixture(scope="session")
def pruned_student(teacher_dir, tmp_path_factory) -> Path:
    """The embedded teacher pruned to ~50% of its parameters (small calibration: this is a test)."""
    from training.prune import run_prune

    out = tmp_path_factory.mktemp("student") / "smollm2-pruned"
    run_prune(out, target_params="0.5", calib_samples=32, seq_len=128)
    return out


@pytest.fixture(scope="session")
def real_tokenizer_dir(tmp_path_factory) -> Path:
    """The embedded teacher's tokenizer (read from its GGUF in seconds, no model export)."""
    from transformers import AutoTokenizer

    from training.teacher import embedded_gguf

    gguf = embedded_gguf()
    out = tmp_path_factory.mktemp("tokenizer")
    AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name).save_pretrained(out)
    return out


def tiny_checkpoint(out: Path, tokenizer_dir: Path, seed: int, **config) -> Path:
    """A tiny random Llama with the real tokenizer's vocabulary, saved like a real checkpoint."""
    import shutil

    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    settings = dict(
        vocab_size=49152,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        tie_word_embeddings=True,
        bos_token_id=1,
        eos_token_id=2,
    )
    LlamaForCausalLM(LlamaConfig(**{**settings, **config})).save_pretrained(out)
    for file in Path(tokenizer_dir).iterdir():
        shutil.copy(file, out / file.name)
    return out


@pytest.fixture(scope="session")
def tiny_pair(real_tokenizer_dir, tmp_path_factory) -> tuple[Path, Path]:
    """(teacher, student) tiny checkpoints sharing the real vocabulary: distillation in seconds."""
    root = tmp_path_factory.mktemp("tiny_pair")
    return (
        tiny_checkpoint(root / "teacher", real_tokenizer_dir, seed=0, hidden_size=64, intermediate_size=128),
        tiny_checkpoint(root / "student", real_tokenizer_dir, seed=1),
    )
