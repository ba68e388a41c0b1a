"""The `kdlora` command line.

Subcommands import their implementation inside their handler, so `kdlora --help` loads no torch or
vLLM and `kdlora serve` loads no training code but distill's option definitions (no torch either). Bad
input raises `KdloraError`, printed as one line (traceback only with --debug).
"""

import argparse
import sys
from pathlib import Path

from hub.errors import KdloraError
from kdlora_serve import __version__
from training.distill_config import DATA_HELP, DistillConfig  # distill's options, defined once; no torch
from training.options import add_config_arguments, check_options, parse_ranks


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):  # argparse's default prints the whole usage block
        sys.stderr.write(f"{self.prog}: error: {message} (see '{self.prog} --help')\n")
        raise SystemExit(2)


def _doctor(args) -> int:
    from kdlora_serve.doctor import run_doctor

    return run_doctor()


def _teacher_export(args) -> int:
    from training.teacher import export_teacher

    print(export_teacher(args.out, args.gguf))
    return 0


def _teacher_answers(args) -> int:
    from training.answers import answer_prompts

    print(
        answer_prompts(
            args.prompts,
            args.out,
            teacher=args.teacher,
            max_tokens=args.max_tokens,
            temperature=args.temperature,
            seed=args.seed,
        )
    )
    return 0


def _teacher_cache(args) -> int:
    from training.teacher_cache import build_cache

    print(
        build_cache(
            args.data,
            args.out,
            teacher=args.teacher,
            seq_len=args.seq_len,
            top_k=args.top_k,
            temperature=args.temperature,
            batch_size=args.batch_size,
            sampling=args.sampling,
            seed=args.seed,
        )
    )
    return 0


def _quickstart(args) -> int:
    from kdlora_serve.quickstart import run_quickstart

    return run_quickstart(args.out, mode="full" if args.full else "smoke" if args.smoke else "fast")


def _hub_inspect(args) -> int:
    from hub.card import evidence, rank_table
    from hub.remote import read_remote_metadata

    meta, config = read_remote_metadata(args.src, endpoint=args.endpoint)
    base = meta.base_model.id + (f"@{meta.base_model.revision}" if meta.base_model.revision else "")
    print(f"adapter    {args.src}")
    print(f"base       {base}")
    print(f"teacher    {meta.teacher.id if meta.teacher else '-'}")
    print(
        f"ranks      1..{meta.max_rank} ({'nested' if meta.nested else 'fixed'}), default {meta.default_rank}, lora_alpha {config.get('lora_alpha')}"
    )
    print(f"targets    {', '.join(sorted(config.get('target_modules') or []))}")
    if meta.recipe:
        print(f"recipe     {meta.recipe.model_dump_json(exclude_none=True)}")
    print()
    print(rank_table(meta) + evidence(meta) if meta.ranks else "(no evaluated ranks)")
    return 0


def _hub_truncate(args) -> int:
    import tempfile

    from hub.adapter import truncate_adapter
    from hub.atomic import require_empty_out
    from hub.remote import fetch_adapter, parse_repo

    require_empty_out(args.out)
    with tempfile.TemporaryDirectory() as staging:
        src = fetch_adapter(parse_repo(args.src), Path(staging), endpoint=args.endpoint)
        print(truncate_adapter(src, args.rank, args.out))
    return 0


def _hub_push(args) -> int:
    from hub.remote import push

    for where in push(
        args.src,
        args.repo,
        student=args.student,
        student_repo=args.student_repo,
        materialize_ranks=args.materialize_ranks,
        private=args.private,
        endpoint=args.endpoint,
    ):
        print(where)
    return 0


def _hub_pull(args) -> int:
    from hub.remote import pull_adapter

    print(pull_adapter(args.repo, args.out, rank=args.rank, endpoint=args.endpoint))
    return 0


def _prune(args) -> int:
    from training.prune import run_prune

    dims = dict(
        hidden_size=args.hidden_size,
        num_attention_heads=args.num_heads,
        num_key_value_heads=args.num_kv_heads,
        intermediate_size=args.intermediate_size,
        num_hidden_layers=args.num_layers,
    )
    if args.plan:
        from training.prune import plan_prune

        print(
            plan_prune(
                args.teacher,
                args.target_params,
                args.batch_size,
                args.seq_len,
                args.device_gb,
                cuda=None if args.plan_device is None else args.plan_device == "cuda",
                **dims,
            )
        )
        return 0
    if args.out is None:
        raise KdloraError("give --out DIR (where the student goes), or --plan to only estimate memory")
    report = run_prune(
        args.out,
        teacher=args.teacher,
        target_params=args.target_params,
        calib_data=args.calib_data,
        calib_samples=args.calib_samples,
        seq_len=args.seq_len,
        batch_size=args.batch_size,
        **dims,
    )
    if report is not None:  # the main process's (other processes of a launch return None)
        print(args.out)
    return 0


def _distill(args) -> int:
    if args.out is None and not args.plan:
        raise KdloraError("give --out DIR (where the result goes), or --plan to only estimate memory")
    fields = {k: v for k, v in vars(args).items() if k in DistillConfig.__dataclass_fields__ and v is not None}
    cfg = DistillConfig(**{"out": Path("(plan)"), **fields})
    check_options(cfg)  # before torch loads: a bad choice is one line at once, with --plan too
    if args.plan:
        from training.plan import plan

        print(
            plan(
                cfg,
                devices=args.devices,
                sharding=args.sharding,
                device_gb=args.device_gb,
                cuda=None if args.plan_device is None else args.plan_device == "cuda",
            )
        )
        return 0
    from training.distill import run_distill

    if run_distill(cfg) is not None:  # the main process's report (other processes of a launch return None)
        print(args.out)
    return 0


def _serve(args) -> int:
    from kdlora_serve.serve import run_serve

    return run_serve(args.adapter, args.host, args.port, args.max_loras, args.allow, args.extra, endpoint=args.endpoint)


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="kdlora", description="Distil, publish and serve elastic-rank LoRA students.")
    parser.add_argument("--version", action="version", version=f"kdlora {__version__}")
    parser.add_argument("--debug", action="store_true", help="show tracebacks for errors")
    commands = parser.add_subparsers(title="commands", metavar="COMMAND", required=True, parser_class=_Parser)

    quickstart = commands.add_parser("quickstart", help="the whole pipeline on the embedded default model, offline")
    quickstart.add_argument(
        "--out",
        type=Path,
        default=Path("kdlora-quickstart"),
        help="work directory (reused: finished stages are skipped)",
    )
    speed = quickstart.add_mutually_exclusive_group()
    speed.add_argument("--fast", action="store_true", help="short training (default; README gives measured times)")
    speed.add_argument("--full", action="store_true", help="train long enough for the numbers to mean something")
    speed.add_argument("--smoke", action="store_true", help=argparse.SUPPRESS)  # seconds of training: tests only
    quickstart.set_defaults(handler=_quickstart)

    doctor = commands.add_parser("doctor", help="check the environment and say how to fix each problem")
    doctor.set_defaults(handler=_doctor)

    teacher = commands.add_parser(
        "teacher", help="the embedded teacher (SmolLM2-135M-Instruct), its answers and its cached targets"
    )
    teacher_commands = teacher.add_subparsers(title="commands", metavar="COMMAND", required=True, parser_class=_Parser)
    export = teacher_commands.add_parser("export", help="write the teacher as a transformers checkpoint")
    export.add_argument("--out", type=Path, required=True, help="new or empty directory to write")
    export.add_argument(
        "--gguf", type=Path, default=None, help="a Llama-family GGUF to convert (default: the embedded teacher)"
    )
    export.set_defaults(handler=_teacher_export)
    answers = teacher_commands.add_parser(
        "answers", help="the teacher's answers to a prompts file, for sequence-level KD (vLLM batch, resumable)"
    )
    answers.add_argument(
        "--prompts", type=Path, required=True, help='JSONL of {"prompt": ...} or {"messages": [...]} records'
    )
    answers.add_argument(
        "--out", type=Path, required=True, help="JSONL to write (kdlora distill --data reads it); resumes <out>.partial"
    )
    answers.add_argument(
        "--teacher", help="checkpoint directory or Hub id vLLM can load (default: the embedded teacher)"
    )
    answers.add_argument("--max-tokens", type=int, default=128, help="longest answer (default 128)")
    answers.add_argument(
        "--temperature", type=float, default=0.0, help="0 = greedy (default); above 0 samples, seeded per prompt"
    )
    answers.add_argument("--seed", type=int, default=0)
    answers.set_defaults(handler=_teacher_answers)
    cache = teacher_commands.add_parser(
        "cache",
        help="the teacher's top-k log-probs on the training rows, once, for `distill --teacher-cache` (resumable)",
    )
    cache.add_argument(
        "--data",
        metavar="SPEC",
        default="builtin:pydoc",
        help=DATA_HELP + " (default builtin:pydoc; as distill's --data)",
    )
    cache.add_argument("--out", type=Path, required=True, help="directory to write; resumes <out>.partial")
    cache.add_argument("--teacher", help="Hub id or checkpoint directory (default: the embedded teacher)")
    cache.add_argument("--seq-len", type=int, default=256, help="as distill's --seq-len (default 256)")
    cache.add_argument(
        "--top-k",
        type=int,
        default=64,
        help="log-probs kept per token, plus one bucket for the rest; rs-kd: ids drawn per token (default 64)",
    )
    cache.add_argument(
        "--sampling",
        choices=("top-k", "rs-kd"),
        default="top-k",
        help="top-k: the k most likely ids; rs-kd: k ids drawn from the teacher, unbiased (arXiv 2503.16870)",
    )
    cache.add_argument("--seed", type=int, default=0, help="rs-kd: seed of the draws (default 0)")
    cache.add_argument("--temperature", type=float, default=2.0, help="as distill's --kd-temperature (default 2.0)")
    cache.add_argument("--batch-size", type=int, default=8, help="rows per teacher forward (default 8)")
    cache.set_defaults(handler=_teacher_cache)

    prune = commands.add_parser("prune", help="Minitron-style structured pruning of a teacher into a student")
    prune.add_argument("--teacher", help="Hub id or checkpoint directory (default: the embedded SmolLM2-135M-Instruct)")
    prune.add_argument("--out", type=Path, help="new or empty directory for the student checkpoint")
    prune.add_argument("--target-params", help="student size: absolute (70M, 1.5B) or a fraction of the teacher (0.5)")
    for flag in ("--hidden-size", "--num-heads", "--num-kv-heads", "--intermediate-size", "--num-layers"):
        prune.add_argument(
            flag, type=int, help="explicit student dimension (the rest: teacher's, or solved from --target-params)"
        )
    prune.add_argument("--calib-data", default="builtin:pydoc", metavar="SPEC", help=DATA_HELP)
    prune.add_argument("--calib-samples", type=int, default=1024, help="calibration blocks (default 1024)")
    prune.add_argument("--seq-len", type=int, default=256, help="tokens per block (default 256)")
    prune.add_argument("--batch-size", type=int, default=8)
    prune.add_argument(
        "--plan",
        action="store_true",
        help="only print the estimated peak memory per process (configs only, no weights)",
    )
    prune.add_argument("--device-gb", type=float, help="--plan: memory per process, to say whether it fits")
    prune.add_argument(
        "--plan-device",
        choices=("cpu", "cuda"),
        help="--plan: plan for GPUs or CPU processes (default: this machine's)",
    )
    prune.set_defaults(handler=_prune)

    distill = commands.add_parser(
        "distill", help="knowledge distillation into one nested-rank adapter (or the whole student)"
    )
    add_config_arguments(distill, DistillConfig, optional={"out"})  # --plan needs no --out
    distill.add_argument(
        "--plan", action="store_true", help="only print the estimated peak memory per device (configs only, no weights)"
    )
    distill.add_argument("--devices", type=int, default=1, help="--plan: devices the run spreads over (default 1)")
    distill.add_argument(
        "--sharding", choices=("ddp", "fsdp"), default="ddp", help="--plan: how the student is spread (default ddp)"
    )
    distill.add_argument(
        "--device-gb", type=float, help="--plan: memory per device, to say whether it fits and what would make it"
    )
    distill.add_argument(
        "--plan-device",
        choices=("cpu", "cuda"),
        help="--plan: plan for GPUs or CPU processes (default: this machine's)",
    )
    distill.set_defaults(handler=_distill)

    serve = commands.add_parser(
        "serve",
        help="serve adapters at any rank from vLLM's OpenAI-compatible server",
        description="Extra vLLM flags go after `--`, e.g. kdlora serve --adapter org/a -- --dtype float32 --api-key KEY",
    )
    serve.add_argument(
        "--adapter", action="append", required=True, help="Hub repo ORG/NAME[@REV] or adapter directory (repeatable)"
    )
    serve.add_argument("--host", default="127.0.0.1")
    serve.add_argument("--port", type=int, default=8000)
    serve.add_argument("--max-loras", type=int, default=4, help="adapter ranks resident at once (vLLM --max-loras)")
    serve.add_argument(
        "--allow",
        action="append",
        default=[],
        metavar="PATTERN",
        help="repo ids requests may pull on demand, e.g. 'myorg/*' (repeatable; default: only --adapter ones)",
    )
    serve.add_argument("--endpoint", help="Hub endpoint (default: $HF_ENDPOINT, else huggingface.co)")
    serve.set_defaults(handler=_serve)

    hub = commands.add_parser("hub", help="inspect, truncate, push and pull nested-rank adapters")
    hub_commands = hub.add_subparsers(title="commands", metavar="COMMAND", required=True, parser_class=_Parser)
    src_help = "adapter: a local directory, file:///PATH, or a Hub repo ORG/NAME[@REVISION]"
    endpoint_help = "Hub endpoint (default: $HF_ENDPOINT, else huggingface.co); token from $HF_TOKEN"
    inspect = hub_commands.add_parser("inspect", help="show an adapter's ranks, quality and size")
    inspect.add_argument("src", help=src_help)
    inspect.set_defaults(handler=_hub_inspect)
    truncate = hub_commands.add_parser("truncate", help="write the exact rank-K adapter as a plain PEFT adapter")
    truncate.add_argument("src", help=src_help)
    truncate.add_argument("--rank", type=int, required=True, help="1 <= K <= max rank")
    truncate.add_argument("--out", type=Path, required=True, help="new or empty directory to write")
    truncate.set_defaults(handler=_hub_truncate)
    push = hub_commands.add_parser("push", help="publish an adapter (and its student) in one commit per repo")
    push.add_argument("src", type=Path, help="local adapter directory")
    push.add_argument("--repo", required=True, help="ORG/NAME on the Hub, or a local directory hub path / file:///PATH")
    push.add_argument("--student", type=Path, help="student checkpoint directory to publish first")
    push.add_argument("--student-repo", help="repo for --student (same forms as --repo)")
    push.add_argument(
        "--materialize-ranks",
        type=parse_ranks,
        default=[],
        metavar="K,K,...",
        help="also write pre-truncated r<K>/ folders for users without kdlora",
    )
    push.add_argument("--private", action="store_true", help="create the repo(s) private")
    push.set_defaults(handler=_hub_push)
    pull = hub_commands.add_parser("pull", help="download and validate an adapter (safetensors only)")
    pull.add_argument("repo", help=src_help)
    pull.add_argument("--out", type=Path, required=True, help="new or empty directory to write")
    pull.add_argument("--rank", type=int, help="write the rank-K truncation instead of the full adapter")
    pull.set_defaults(handler=_hub_pull)
    for command in (inspect, truncate, push, pull):
        command.add_argument("--endpoint", help=endpoint_help)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    extra = []
    if "--" in argv:  # everything after `--` goes to vLLM untouched (kdlora serve)
        at = argv.index("--")
        argv, extra = argv[:at], argv[at + 1 :]
    args = build_parser().parse_args(argv)
    args.extra = extra
    if extra and args.handler is not _serve:
        print("kdlora: error: arguments after `--` are only for kdlora serve", file=sys.stderr)
        return 2
    try:
        return args.handler(args)
    except KdloraError as err:
        if args.debug:
            raise
        print(f"kdlora: error: {err}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("kdlora: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
