"""The `kdlora` command line.

Subcommands import their implementation inside their handler, so `kdlora --help` loads no torch or
vLLM and `kdlora serve` never loads training code. Bad input raises `KdloraError`, printed as one
line (traceback only with --debug).
"""

import argparse
import sys
from pathlib import Path

from hub.errors import KdloraError
from kdlora_serve import __version__


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


def _quickstart(args) -> int:
    from kdlora_serve.quickstart import run_quickstart

    return run_quickstart(max_tokens=args.max_tokens)


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="kdlora", description="Distil, publish and serve elastic-rank LoRA students.")
    parser.add_argument("--version", action="version", version=f"kdlora {__version__}")
    parser.add_argument("--debug", action="store_true", help="show tracebacks for errors")
    commands = parser.add_subparsers(title="commands", metavar="COMMAND", required=True, parser_class=_Parser)

    quickstart = commands.add_parser("quickstart", help="run the main job on the embedded default model")
    quickstart.add_argument("--max-tokens", type=int, default=32, help="tokens to generate per prompt")
    quickstart.set_defaults(handler=_quickstart)

    doctor = commands.add_parser("doctor", help="check the environment and say how to fix each problem")
    doctor.set_defaults(handler=_doctor)

    teacher = commands.add_parser("teacher", help="the embedded teacher (SmolLM2-135M-Instruct)")
    teacher_commands = teacher.add_subparsers(title="commands", metavar="COMMAND", required=True, parser_class=_Parser)
    export = teacher_commands.add_parser("export", help="write the teacher as a transformers checkpoint")
    export.add_argument("--out", type=Path, required=True, help="new or empty directory to write")
    export.add_argument("--gguf", type=Path, default=None, help="a Llama-family GGUF to convert (default: the embedded teacher)")
    export.set_defaults(handler=_teacher_export)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
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
