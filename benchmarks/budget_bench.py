"""Latency budgets under load: open-loop Poisson arrivals, kdlora's load-aware rank choice vs fixed ranks (issue 14).

One `kdlora serve` on 127.0.0.1 (the dtype it picks on this machine) with a real distilled adapter and its
per-rank quality (benchmarks/.work/task/sandwich-seed-0 from task_bench.py, R = 64 on the healed student).
Every rank is warmed first (no cold loads in the measurement). Saturation = completed requests/s of a closed
loop of `--saturation-concurrency` requests at rank 64. Then, per arrival rate (fractions of saturation) and
policy, `--requests` streamed requests arrive as a Poisson process (seeded), each carrying a budget drawn from a
fixed mix:
  40% latency_ms_per_token tight, 30% loose, 20% loose + min_quality (teacher top-1 agreement, met by
  ranks >= 32 only), 10% no budget;
tight / loose = 1.1x the measured decode ms/token of rank 1 / rank 64 alone. Policies: "kdlora" sends the
budget (kdlora picks the rank at the current load), "fixed r64" / "fixed r8" name the rank and send no budget; the
"kdlora" policy runs again on a server with vLLM's stock LoRA path (KDLORA_RANK_AWARE=0), same budgets and rates.
A request is within budget when its decode ms/token (first to last streamed token, measured by the client)
is <= its latency bound and its served rank's quality >= its floor. Reported per rate and policy: % within
budget, mean served rank and quality, p50 / p99 TTFT and decode ms/token. JSON + PNG to benchmarks/results/.

    .venv/bin/python benchmarks/budget_bench.py [--rates 0.25,0.5,0.8] [--requests 40] [--tokens 32] [--dtype float32]
"""

import argparse
import json
import os
import platform
import random
import threading
import time
from pathlib import Path

from serve_bench import PROMPTS, RESULTS, WORK, start_server

ADAPTER = WORK / "task" / "sandwich-seed-0"
MIX = [("tight", None)] * 4 + [("loose", None)] * 3 + [("loose", "floor")] * 2 + [(None, None)]


def start(adapter: Path, rank_aware: bool, dtype: str | None):
    log = WORK / f"server-budget-{'rank-aware' if rank_aware else 'stock'}-{dtype or 'default'}.log"
    return start_server(adapter, rank_aware, dtype, log)


def warm(client, alias: str, ranks) -> None:
    for rank in ranks:  # every rank resident, and its cold first request behind us
        for _ in range(2):
            stream(client, f"{alias}@r{rank}", PROMPTS[0], 4, None)


def stream(client, model: str, prompt: str, tokens: int, budget: dict | None) -> dict:
    """One streamed request: TTFT, decode ms/token (first to last token), served rank."""
    extra = {"ignore_eos": True} | ({"kdlora": budget} if budget else {})
    started = time.perf_counter()
    times, served = [], None
    for chunk in client.completions.create(
        model=model, prompt=prompt, max_tokens=tokens, temperature=0.0, stream=True, extra_body=extra
    ):
        if chunk.choices and chunk.choices[0].text is not None:
            times.append(time.perf_counter())
            served = chunk.model
    decode = 1000 * (times[-1] - times[0]) / (len(times) - 1) if len(times) > 1 else None
    return {"ttft_s": times[0] - started, "decode_ms": decode, "rank": int(served.rsplit("@r", 1)[1])}


def closed_loop_rate(client, model: str, concurrency: int, tokens: int, seconds: float = 20.0) -> float:
    """Completed requests per second with `concurrency` requests always in flight."""
    done, stop = [], time.perf_counter() + seconds

    def worker(i):
        while time.perf_counter() < stop:
            stream(client, model, PROMPTS[i % len(PROMPTS)], tokens, None)
            done.append(time.perf_counter())

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(concurrency)]
    started = time.perf_counter()
    [t.start() for t in threads]
    [t.join() for t in threads]
    return len(done) / (time.perf_counter() - started)


def poisson_run(
    client, alias: str, policy: str, rate: float, count: int, tokens: int, limits: dict, seed: int
) -> list[dict]:
    rng = random.Random(seed)
    arrivals, at = [], 0.0
    for i in range(count):
        at += rng.expovariate(rate)
        latency, floor = MIX[rng.randrange(len(MIX))]
        budget = {
            k: v
            for k, v in {"latency_ms_per_token": limits.get(latency), "min_quality": limits.get(floor)}.items()
            if v is not None
        }
        arrivals.append((at, PROMPTS[i % len(PROMPTS)], budget))
    results = [None] * count

    def send(i, prompt, budget):
        model = {"kdlora": alias, "fixed r64": f"{alias}@r64", "fixed r8": f"{alias}@r8"}[policy]
        results[i] = stream(client, model, prompt, tokens, budget if policy == "kdlora" else None) | {"budget": budget}

    threads, started = [], time.perf_counter()
    for i, (at, prompt, budget) in enumerate(arrivals):  # open loop: each request at its time, whatever is in flight
        time.sleep(max(0.0, started + at - time.perf_counter()))
        threads.append(threading.Thread(target=send, args=(i, prompt, budget)))
        threads[-1].start()
    [t.join() for t in threads]
    return results


def summarize(results: list[dict], quality: dict[int, float]) -> dict:
    def within(r):
        bound, floor = r["budget"].get("latency_ms_per_token"), r["budget"].get("min_quality")
        return (bound is None or (r["decode_ms"] is not None and r["decode_ms"] <= bound)) and (
            floor is None or quality[r["rank"]] >= floor
        )

    def percentile(values, q):
        values = sorted(v for v in values if v is not None)
        return values[min(len(values) - 1, int(q * len(values)))] if values else None

    return {
        "within_budget": sum(map(within, results)) / len(results),
        "mean_rank": sum(r["rank"] for r in results) / len(results),
        "mean_quality": sum(quality[r["rank"]] for r in results) / len(results),
        "ttft_p50_s": percentile([r["ttft_s"] for r in results], 0.5),
        "ttft_p99_s": percentile([r["ttft_s"] for r in results], 0.99),
        "decode_p50_ms": percentile([r["decode_ms"] for r in results], 0.5),
        "decode_p99_ms": percentile([r["decode_ms"] for r in results], 0.99),
    }


def main() -> None:
    from openai import OpenAI

    from hub.schema import load_metadata

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rates", default="0.25,0.5,0.8", help="arrival rates as fractions of saturation")
    parser.add_argument("--requests", type=int, default=40, help="requests per rate and policy")
    parser.add_argument("--tokens", type=int, default=32)
    parser.add_argument("--saturation-concurrency", type=int, default=8)
    parser.add_argument("--policies", default="kdlora,fixed r64,fixed r8", help="on the rank-aware server")
    parser.add_argument(
        "--stock-policies", default="kdlora", help="on a server with vLLM's stock LoRA path (KDLORA_RANK_AWARE=0)"
    )
    parser.add_argument(
        "--dtype", help="the servers' dtype (default: the one kdlora serve picks); results go to budget-<dtype>.*"
    )
    args = parser.parse_args()
    meta = load_metadata(ADAPTER)
    quality = {r.rank: r.teacher_top1_agreement for r in meta.ranks}
    alias, rows = ADAPTER.name, []
    for rank_aware, policies in ((True, args.policies), (False, args.stock_policies)):
        proc, url = start(ADAPTER, rank_aware, args.dtype)
        try:
            client = OpenAI(base_url=url + "/v1", api_key="-", max_retries=0, timeout=600)
            warm(client, alias, sorted(quality))
            if rank_aware:  # budgets and rates from the rank-aware server, the same for the stock one
                alone = {
                    rank: stream(client, f"{alias}@r{rank}", PROMPTS[1], args.tokens, None)["decode_ms"]
                    for rank in (1, 64)
                }
                limits = {"tight": 1.1 * alone[1], "loose": 1.1 * alone[64], "floor": quality[32]}
                saturation = closed_loop_rate(client, f"{alias}@r64", args.saturation_concurrency, args.tokens)
                print(
                    f"decode alone: r1 {alone[1]:.1f} ms, r64 {alone[64]:.1f} ms; saturation {saturation:.2f} req/s",
                    flush=True,
                )
            for fraction in map(float, args.rates.split(",")):
                for number, policy in enumerate(policies.split(",")):
                    results = poisson_run(
                        client, alias, policy, fraction * saturation, args.requests, args.tokens, limits, seed=number
                    )
                    row = {
                        "rate_fraction": fraction,
                        "rate_rps": fraction * saturation,
                        "server": "rank-aware" if rank_aware else "stock",
                        "policy": policy,
                        **summarize(results, quality),
                    }
                    rows.append(row)
                    print(json.dumps(row), flush=True)
        finally:
            proc.terminate()
            proc.wait(timeout=120)
    summary = {
        "machine": {"platform": platform.platform(), "cpus": os.cpu_count(), "python": platform.python_version()},
        "settings": vars(args),
        "adapter": str(ADAPTER),
        "quality_by_rank": quality,
        "limits": limits,
        "decode_alone_ms": alone,
        "saturation_rps": saturation,
        "rows": rows,
    }
    RESULTS.mkdir(parents=True, exist_ok=True)
    stem = f"budget-{args.dtype}" if args.dtype else "budget"
    (RESULTS / f"{stem}.json").write_text(json.dumps(summary, indent=1) + "\n")
    plot(summary, RESULTS / f"{stem}.png")


def plot(summary: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(14, 4), dpi=110)
    for server, policy in dict.fromkeys((r["server"], r["policy"]) for r in summary["rows"]):
        rows = [r for r in summary["rows"] if (r["server"], r["policy"]) == (server, policy)]
        x, label, style = (
            [r["rate_fraction"] for r in rows],
            f"{policy} ({server})",
            "o-" if server == "rank-aware" else "s--",
        )
        axes[0].plot(x, [100 * r["within_budget"] for r in rows], style, label=label)
        axes[1].plot(x, [r["mean_quality"] for r in rows], style, label=label)
        axes[2].plot(x, [r["decode_p50_ms"] for r in rows], style, label=label)
    for axis, title in zip(
        axes, ("% of requests within budget", "mean quality served (top-1 agreement)", "p50 decode ms/token")
    ):
        axis.set_xlabel("arrival rate / saturation")
        axis.set_title(title, fontsize=10)
    axes[2].axhline(summary["limits"]["tight"], color="gray", linestyle=":")
    axes[2].axhline(summary["limits"]["loose"], color="gray", linestyle="--")
    axes[0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path)


if __name__ == "__main__":
    main()
