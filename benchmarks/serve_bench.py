"""Serving cost per rank, rank-aware path vs stock vLLM, side by side (one server process per mode).

For each mode (KDLORA_RANK_AWARE=1: kdlora's rank-aware path, the grouped one on CPU, the Triton kernels on
CUDA; =0: vLLM's stock path) and dtype, `kdlora serve` starts once on 127.0.0.1 with a nested adapter of max rank 64 on the embedded
teacher; every rank is warmed, then throughput (generated tok/s, greedy, fixed length) is measured at
concurrency 1 and 8 for the base model and each rank, plus one batch of 8 requests mixing all ranks
(to compare with its largest rank alone), interleaved round-robin over `--rounds` rounds so load drift
hits all rows alike. Ratios are to the base model measured in the same server run.

Also time to first token (TTFT, streamed, 4 tokens), before the throughput runs, medians of three: adapters
given at start, never requested (three copies of the adapter under other names); after one request to the
adapter at its default rank, ranks of it never requested before (2, 3, 5); the same ranks warm; once, an
adapter pulled on demand from a Hub (the test suite's local server
speaking the Hub's HTTP protocol, on 127.0.0.1: the real Hub is out of reach here; --allow 'bench/*').
Writes JSON + PNG to benchmarks/results/ (serve.* on CPU, serve_gpu.* on CUDA).

    .venv/bin/python benchmarks/serve_bench.py [--dtypes float32,bfloat16] [--modes stock,rank-aware] [--tokens 64] [--rounds 2]
        [--concurrency 1,8,32]
"""

import argparse
import concurrent.futures
import contextlib
import json
import os
import platform
import shutil
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
WORK = ROOT / "benchmarks" / ".work"
RESULTS = ROOT / "benchmarks" / "results"
RANKS = [1, 4, 8, 16, 32, 64]
PROMPTS = [
    "The three most useful Python built-in functions are",
    "def fibonacci(n):",
    "A list in Python is",
    "Write one sentence about the sea.",
    "The capital of Italy is",
    "import numpy as np",
    "Dear team,",
    "SELECT name FROM",
]


def make_adapter() -> Path:
    """A random nested adapter (R=64) on the embedded teacher, written once."""
    out = WORK / "bench-adapter"
    if (out / "kdlora.json").exists():
        return out
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from hub.adapter import adapter_bytes, read_adapter
    from hub.schema import ModelRef, RankMetadata, RankResult
    from training.teacher import embedded_teacher

    teacher = embedded_teacher()
    torch.manual_seed(0)
    model = get_peft_model(
        AutoModelForCausalLM.from_pretrained(teacher, dtype=torch.float32),
        LoraConfig(r=64, lora_alpha=64, target_modules="all-linear", init_lora_weights=False),
    )
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.mul_(0.05)
    model.save_pretrained(out)
    RankMetadata(max_rank=64, default_rank=8, base_model=ModelRef(id=str(teacher))).save(out)
    adapter = read_adapter(out)
    RankMetadata(
        max_rank=64,
        default_rank=8,
        base_model=ModelRef(id=str(teacher)),
        ranks=[RankResult(rank=k, adapter_bytes=adapter_bytes(adapter, k)) for k in RANKS],
    ).save(out)
    return out


def start_server(adapter: Path, rank_aware: bool, dtype: str | None, log: Path, more_args=(), env=None):
    """`kdlora serve` with `adapter`; dtype None: the one kdlora serve picks on this machine."""
    from kdlora_serve.serve import start_background

    env = {
        **os.environ,
        **(env or {}),
        "KDLORA_RANK_AWARE": "1" if rank_aware else "0",
        "VLLM_NO_USAGE_STATS": "1",
        "KDLORA_CACHE": str(WORK / "cache"),
    }
    return start_background(
        [
            "--adapter",
            str(adapter),
            *more_args,
            "--max-loras",
            "8",
            "--",
            "--served-model-name",
            "base",
            *(["--dtype", dtype] if dtype else []),
            "--max-model-len",
            "1024",
        ],
        log,
        env=env,
    )


@contextlib.contextmanager
def hub_with(adapter: Path, repo: str):
    """The test suite's local Hub server (tests/hf_server.py) on 127.0.0.1 holding `adapter` as `repo`."""
    sys.path.insert(0, str(ROOT / "tests"))
    from hf_server import serve_fake_hub

    with serve_fake_hub() as (url, hub):
        hub.create_repo(repo)
        hub.commit(repo, {p.name: p.read_bytes() for p in adapter.iterdir() if p.is_file()})
        yield url


def throughput(client, model: str | list[str], concurrency: int, tokens: int) -> float:
    """Generated tok/s of `concurrency` simultaneous requests; a list of models is cycled over the requests."""
    models = [model] if isinstance(model, str) else model

    def one(i):
        reply = client.completions.create(
            model=models[i % len(models)],
            prompt=PROMPTS[i % len(PROMPTS)],
            max_tokens=tokens,
            temperature=0.0,
            extra_body={"ignore_eos": True},
        )
        return reply.usage.completion_tokens

    started = time.perf_counter()
    with concurrent.futures.ThreadPoolExecutor(concurrency) as pool:
        generated = sum(pool.map(one, range(concurrency)))
    return generated / (time.perf_counter() - started)


def ttft(client, model: str) -> float:
    started = time.perf_counter()
    stream = client.completions.create(model=model, prompt=PROMPTS[0], max_tokens=4, temperature=0.0, stream=True)
    next(iter(stream))
    elapsed = time.perf_counter() - started
    for _ in stream:
        pass
    return elapsed


def run_mode(adapter, rank_aware, dtype, tokens, rounds, concurrencies=(1, 8)) -> dict:
    from openai import OpenAI

    name = f"{'rank-aware' if rank_aware else 'stock'}-{dtype}"
    copies = [
        WORK / f"bench-adapter-{i}" for i in (2, 3, 4)
    ]  # the same weights under other names: given at start, never requested
    for copy in copies:
        if not copy.exists():
            shutil.copytree(adapter, copy)
    with hub_with(adapter, "bench/on-demand") as hub_url:
        given = [arg for copy in copies for arg in ("--adapter", str(copy))]
        proc, url = start_server(
            adapter,
            rank_aware,
            dtype,
            WORK / f"server-{name}.log",
            [*given, "--allow", "bench/*"],
            {"HF_ENDPOINT": hub_url, "HF_HUB_DISABLE_XET": "1"},
        )
        try:
            return measure(
                OpenAI(base_url=url + "/v1", api_key="-", max_retries=0, timeout=600),
                name,
                adapter.name,
                [copy.name for copy in copies],
                tokens,
                rounds,
                concurrencies,
            )
        finally:
            proc.terminate()
            proc.wait(timeout=120)


def measure(client, name, alias, given, tokens, rounds, concurrencies=(1, 8)) -> dict:
    """TTFTs (each first request once per server, so three of each, medians kept with the values) and throughput."""
    firsts = {"new_adapter_given_at_start": [ttft(client, f"{other}@r2") for other in given]}
    ttft(client, f"{alias}@r8")  # the adapter in use (its default rank) ...
    firsts["new_rank"] = [
        ttft(client, f"{alias}@r{k}") for k in (2, 3, 5)
    ]  # ... then ranks of it never requested before
    firsts["warm"] = [ttft(client, f"{alias}@r{k}") for k in (2, 3, 5)]
    ttfts = {case: statistics.median(values) for case, values in firsts.items()}
    ttfts["new_adapter_pulled_on_demand"] = ttft(client, "bench/on-demand@r2")
    models = ["base"] + [f"{alias}@r{k}" for k in RANKS]
    for model in models:
        throughput(client, model, 1, 4)  # warm-up: every rank resident before timing
    mixed = [f"{alias}@r{k}" for k in RANKS]  # one batch of 8 requests over all ranks, vs its largest rank alone
    rates = {(m, c): [] for m in models for c in concurrencies} | {("mixed", 8): []}
    for _ in range(rounds):
        for concurrency in concurrencies:
            for model in models:
                rates[(model, concurrency)].append(throughput(client, model, concurrency, tokens))
        rates[("mixed", 8)].append(throughput(client, mixed, 8, tokens))
    mean = {key: sum(v) / len(v) for key, v in rates.items()}
    rows = {}
    for concurrency in concurrencies:
        base = mean[("base", concurrency)]
        rows[f"c{concurrency}"] = {
            "base_tok_s": base,
            **{
                str(k): {
                    "tok_s": mean[(f"{alias}@r{k}", concurrency)],
                    "ratio_to_base": mean[(f"{alias}@r{k}", concurrency)] / base,
                }
                for k in RANKS
            },
        }
    rows["c8"]["mixed"] = {
        "ranks": RANKS + RANKS[:2],
        "tok_s": mean[("mixed", 8)],
        "ratio_to_base": mean[("mixed", 8)] / mean[("base", 8)],
    }
    result = {"mode": name, "ttft_s": ttfts, "ttft_each_s": firsts, "throughput": rows}
    print(json.dumps(result), flush=True)
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dtypes", default="float32,bfloat16")
    parser.add_argument("--modes", default="stock,rank-aware")
    parser.add_argument("--tokens", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--concurrency", default="1,8", help="client concurrencies measured (1 and 8 always)")
    args = parser.parse_args()
    concurrencies = sorted({1, 8, *map(int, args.concurrency.split(","))})
    WORK.mkdir(parents=True, exist_ok=True)
    adapter = make_adapter()
    results = [
        run_mode(adapter, rank_aware, dtype, args.tokens, args.rounds, concurrencies)
        for dtype in args.dtypes.split(",")
        for rank_aware in [mode == "rank-aware" for mode in args.modes.split(",")]
    ]
    import torch

    gpu = torch.cuda.get_device_name() if torch.cuda.is_available() else None
    summary = {
        "machine": {
            "platform": platform.platform(),
            "cpus": os.cpu_count(),
            "python": platform.python_version(),
            "gpu": gpu,
        },
        "settings": vars(args),
        "ranks": RANKS,
        "results": results,
    }
    RESULTS.mkdir(parents=True, exist_ok=True)
    stem = "serve_gpu" if gpu else "serve"
    (RESULTS / f"{stem}.json").write_text(json.dumps(summary, indent=1) + "\n")
    plot(summary, RESULTS / f"{stem}.png")


def plot(summary: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(16, 4), dpi=110, gridspec_kw={"width_ratios": [1, 1, 1.1]})
    axes[1].sharey(axes[0])
    for axis, concurrency in zip(axes, ("c1", "c8")):
        for result in summary["results"]:
            ratios = [result["throughput"][concurrency][str(k)]["ratio_to_base"] for k in summary["ranks"]]
            style = "o-" if result["mode"].startswith("rank-aware") else "s--"
            (line,) = axis.plot(summary["ranks"], ratios, style, label=result["mode"])
            if "mixed" in result["throughput"][concurrency]:  # the mixed batch, drawn at its largest rank
                axis.plot(
                    [max(summary["ranks"])],
                    [result["throughput"][concurrency]["mixed"]["ratio_to_base"]],
                    "*",
                    color=line.get_color(),
                    markersize=11,
                )
        axis.axhline(1.0, color="gray", linestyle=":")
        axis.set_xscale("log", base=2)
        axis.set_xticks(summary["ranks"], [str(k) for k in summary["ranks"]])
        axis.set_xlabel("adapter rank served")
        axis.set_title(
            f"throughput / base, concurrency {concurrency[1:]}"
            + (" (* = one batch mixing all ranks)" if concurrency == "c8" else ""),
            fontsize=10,
        )
    axes[0].set_ylabel("tok/s relative to the base model (same server)")
    axes[0].legend(fontsize=8)
    cases = ["warm", "new_rank", "new_adapter_given_at_start", "new_adapter_pulled_on_demand"]
    width = 0.8 / len(summary["results"])
    for i, result in enumerate(summary["results"]):
        axes[2].bar(
            [c + i * width for c in range(len(cases))],
            [result["ttft_s"][case] for case in cases],
            width,
            label=result["mode"],
        )
    axes[2].set_xticks(
        [c + 0.4 - width / 2 for c in range(len(cases))],
        ["warm", "rank never\nrequested", "adapter given\nat start", "adapter pulled\non demand"],
        fontsize=8,
    )
    axes[2].set_ylabel("time to first token (s)")
    axes[2].set_title("time to first token", fontsize=10)
    axes[2].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path)


if __name__ == "__main__":
    main()
