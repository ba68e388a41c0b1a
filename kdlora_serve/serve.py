"""`kdlora serve`: start vLLM's OpenAI server for an adapter's base student, with the plugin and the
middleware, flags filled in from the adapter metadata. vLLM's own flags pass through after `--`."""

import json
import os
import sys
from pathlib import Path

from hub.errors import KdloraError
from hub.remote import parse_repo, read_remote_metadata
from kdlora_serve.api.store import ENV_ADAPTERS, ENV_ALLOW, ENV_BASE_ID

VLLM_LORA_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)  # the values vLLM accepts for --max-lora-rank


def alias_for(spec: str) -> str:
    ref = parse_repo(spec)
    return ref.repo_id if ref.repo_id else ref.path.name


def serve_command(
    adapters: list[str],
    host: str,
    port: int,
    max_loras: int,
    allow: list[str],
    extra: list[str],
    endpoint: str | None = None,
) -> tuple[list[str], dict[str, str]]:
    """(argv, environment) for the vLLM server process."""
    from kdlora_serve.engine import engine_defaults, server_command

    if not adapters:
        raise KdloraError("give at least one --adapter (a Hub repo id or an adapter directory)")
    metas = {alias_for(spec): (spec, read_remote_metadata(spec, endpoint=endpoint)[0]) for spec in adapters}
    bases = {meta.base_model.id for _, meta in metas.values()}
    if len(bases) > 1:
        raise KdloraError(
            f"the adapters were trained on different base models ({', '.join(sorted(bases))}); one server serves one base"
        )
    base = metas[next(iter(metas))][1].base_model
    max_rank = max(meta.max_rank for _, meta in metas.values())
    lora_rank = next((r for r in VLLM_LORA_RANKS if r >= max_rank), None)
    if lora_rank is None:
        raise KdloraError(
            f"max rank {max_rank} is above the largest rank vLLM serves ({VLLM_LORA_RANKS[-1]}); truncate the adapter first"
        )
    env = dict(os.environ)
    extra, keys = _take_api_keys(list(extra))
    if len(keys) == 1:  # hand it over in the environment: vLLM reads it there too, and it stays out of `ps`
        env["VLLM_API_KEY"] = keys[0]
    elif keys:  # several keys: only the command line carries a list (the middleware reads vLLM's parsed args)
        extra += ["--api-key", *keys]
    if endpoint:  # the server's on-demand pulls go to the same Hub as this command's metadata reads
        env["HF_ENDPOINT"] = endpoint
    engine = engine_defaults()
    flags = [
        "--enable-lora",
        "--max-lora-rank",
        str(lora_rank),
        "--max-loras",
        str(max_loras),
        "--middleware",
        "kdlora_serve.api.middleware.KdloraMiddleware",
        "--enable-logging-iteration-details",  # each step's batch and prefill, for the step model (api/steps.py)
        "--host",
        host,
        "--port",
        str(port),
    ]
    if base.revision and not os.path.exists(base.id):
        flags += ["--revision", base.revision]
    given = {arg.split("=")[0] for arg in extra if arg.startswith("--")}
    flags += [arg for arg in _without(engine.serve_args(), given)]
    env.update({k: v for k, v in engine.env.items() if k not in os.environ})
    env.update(
        {
            "VLLM_ALLOW_RUNTIME_LORA_UPDATING": "1",
            ENV_ADAPTERS: json.dumps({a: spec for a, (spec, _) in metas.items()}),
            ENV_BASE_ID: base.id,
        }
    )
    if allow:
        env[ENV_ALLOW] = ",".join(allow)
    return server_command(base.id, *flags, *extra), env


def _take_api_keys(extra: list[str]) -> tuple[list[str], list[str]]:
    """(the flags without `--api-key`, the keys): `--api-key K [K ...]` and `--api-key=K`, as vLLM parses them."""
    rest, keys, taking = [], [], False
    for arg in extra:
        if arg == "--api-key":
            taking = True
        elif arg.startswith("--api-key="):
            keys.append(arg.partition("=")[2])
            taking = False
        elif taking and not arg.startswith("-"):
            keys.append(arg)
        else:
            taking = False
            rest.append(arg)
    return rest, keys


def _without(flags: list[str], given: set[str]) -> list[str]:
    """Drop kdlora's defaults for flags the user set explicitly."""
    out, skip = [], False
    for i, arg in enumerate(flags):
        if skip:
            skip = False
            continue
        if arg in given:
            skip = i + 1 < len(flags) and not flags[i + 1].startswith("--")
            continue
        out.append(arg)
    return out


def run_serve(adapters, host, port, max_loras, allow, extra, endpoint=None) -> int:
    argv, env = serve_command(adapters, host, port, max_loras, allow, extra, endpoint)
    shown = " ".join(argv)
    print(f"kdlora serve: {shown}", file=sys.stderr, flush=True)
    os.execve(argv[0], argv, env)  # vLLM takes over this process: signals and exit code are its own


def start_background(args: list[str], log: Path, env: dict | None = None, timeout_s: float = 600):
    """Run `kdlora serve ARGS` on a free 127.0.0.1 port; (process, base URL) once /health answers.

    For programs that drive a server of their own (quickstart, tests, benchmarks). Extra vLLM flags
    belong in ARGS after `--`."""
    import subprocess
    import time
    import urllib.request

    port = free_port()
    try:
        at = args.index("--")
    except ValueError:
        at = len(args)
    argv = [str(Path(sys.executable).parent / "kdlora"), "serve", *args[:at], "--port", str(port), *args[at:]]
    process = subprocess.Popen(argv, stdout=open(log, "w"), stderr=subprocess.STDOUT, env=env)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"kdlora serve exited with {process.returncode}:\n{Path(log).read_text()[-4000:]}")
        try:
            with urllib.request.urlopen(url + "/health", timeout=2):
                return process, url
        except OSError:
            time.sleep(1)
    process.kill()
    raise RuntimeError(f"kdlora serve was not healthy after {timeout_s:.0f} s:\n{Path(log).read_text()[-4000:]}")


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on now."""
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]
