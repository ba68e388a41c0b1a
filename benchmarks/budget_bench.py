"""Latency budgets under load (issue 25): open-loop Poisson arrivals, budgets set from what each load allows, every
policy side by side on the same arrivals.

One `kdlora serve` on 127.0.0.1 (the dtype it picks on this machine, or --dtype) with a real distilled adapter and
its per-rank quality (benchmarks/.work/task/sandwich-seed-0: `task_bench.py --only sandwich-seed-0`, R = 64 on the
healed student). Every rank is warmed first. Saturation = completed requests/s of a closed loop of
`--saturation-concurrency` requests at rank 64. Loads: Poisson arrivals at each `--rates` fraction of saturation
(`--requests` each) and a burst (2x saturation for 10 s). Each load's arrivals (times, prompts, budget kinds) are
drawn once from a seed and replayed for every policy.

Budgets from what the load allows: at each load, "fixed r1" and "fixed r64" run first; tight = 1.1x the p50 decode
ms/token of the all-rank-1 run, loose = 1.1x that of the all-rank-64 run; floor = teacher top-1 agreement of the
second-largest evaluated rank (32). Mix: 40% tight, 30% loose, 20% loose + floor, 10% no budget. Policies (the first six on the rank-aware server):
  batch-aware          the budget sent; kdlora picks the rank against the batch in flight (on_miss --on-miss)
  batch-aware+elastic  the same with "elastic": true (in-flight elastic requests lowered for arrivals)
  per-request          the client picks the rank from the budget alone (largest rank whose decode ALONE fits),
                       blind to the batch: what a per-request policy does
  fixed r1 / r8 / r64  that rank named, no budget sent
  stock batch-aware    batch-aware on a server with vLLM's stock LoRA ops (KDLORA_RANK_AWARE=0), same arrivals
A request is within budget when its decode ms/token (first to last streamed token, client-side) is <= its bound
and its served quality >= its floor (elastic: every rank it passed through); a 429 is not within budget. Quality of
a request = its ranks' quality weighted by the tokens each generated (elastic requests report them). Goodput =
tokens of requests within budget per second of the run. The server's step model is checked on held-out steps: each
run's last 32 steps (and the decode-only ones among them), predicted with the fit taken before the run. JSON + PNG to benchmarks/results/budget[-<dtype>].*.

    .venv/bin/python benchmarks/budget_bench.py [--dtype float32] [--rates 0.25,0.5,0.8] [--requests 40] [--tokens 32]
"""

import argparse
import json
import os
import platform
import random
import threading
import time
import urllib.request
from pathlib import Path

from serve_bench import PROMPTS, RESULTS, WORK, start_server

ADAPTER = WORK / "task" / "sandwich-seed-0"
MIX = [("tight", None)] * 4 + [("loose", None)] * 3 + [("loose", "floor")] * 2 + [(None, None)]
POLICIES = ["fixed r1", "fixed r64", "fixed r8", "per-request", "batch-aware", "batch-aware+elastic"]
BURST = ("burst", 2.0, 10.0)  # name, rate x saturation, seconds


def stream(client, model: str, prompt: str, tokens: int, kdlora: dict | None) -> dict:
    """One streamed request: TTFT, decode ms/token (first to last token), served ranks and tokens per rank."""
    from openai import RateLimitError

    extra = {"ignore_eos": True} | ({"kdlora": kdlora} if kdlora else {})
    started = time.perf_counter()
    times, served, report = [], None, None
    try:
        for chunk in client.completions.create(
            model=model, prompt=prompt, max_tokens=tokens, temperature=0.0, stream=True, extra_body=extra
        ):
            report = (chunk.model_extra or {}).get("kdlora") or report
            if chunk.choices and chunk.choices[0].text is not None:
                times.append(time.perf_counter())
                served = chunk.model
    except RateLimitError:
        return {"rejected": True, "answered_s": time.perf_counter() - started}
    rank = int(served.rsplit("@r", 1)[1])
    spans = [(s["rank"], s["tokens"]) for s in report["tokens_per_rank"]] if report else [(rank, len(times))]
    decode = 1000 * (times[-1] - times[0]) / (len(times) - 1) if len(times) > 1 else None
    return {"ttft_s": times[0] - started, "decode_ms": decode, "rank": rank, "spans": spans, "tokens": len(times)}


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


def arrivals(rate: float, count: int, seed: int) -> list[tuple[float, str, tuple]]:
    """(time s, prompt, (latency kind, floor kind)) of a Poisson process at `rate` req/s."""
    rng, at, out = random.Random(seed), 0.0, []
    for i in range(count):
        at += rng.expovariate(rate)
        out.append((at, PROMPTS[i % len(PROMPTS)], MIX[rng.randrange(len(MIX))]))
    return out


def budget_of(kinds: tuple, limits: dict) -> dict:
    latency, floor = kinds
    return {
        k: v
        for k, v in {"latency_ms_per_token": limits.get(latency), "min_quality": limits.get(floor)}.items()
        if v is not None
    }


def request_for(policy: str, alias: str, budget: dict, alone: dict, quality: dict, on_miss: dict) -> tuple:
    """(model, kdlora budget or None) that `policy` sends for a request with `budget`."""
    if policy.startswith("fixed r"):
        return f"{alias}@r{policy.removeprefix('fixed r')}", None
    if policy == "per-request":  # the largest rank whose decode alone fits, and meets the floor; none: the cheapest
        fits = [
            k
            for k in sorted(alone)
            if alone[k] <= budget.get("latency_ms_per_token", float("inf"))
            and quality[k] >= budget.get("min_quality", 0)
        ]
        return f"{alias}@r{max(fits) if fits else min(alone)}", None
    if not budget:
        return alias, None
    return alias, budget | on_miss | ({"elastic": True} if policy.endswith("+elastic") else {})


def run_load(client, alias, policy, load, tokens, limits, alone, quality, on_miss) -> tuple[list[dict], float]:
    """Replay one load's arrivals open loop (each request at its time, whatever is in flight): results, wall s."""
    results = [None] * len(load)

    def send(i, prompt, budget):
        model, kdlora = request_for(policy, alias, budget, alone, quality, on_miss)
        results[i] = stream(client, model, prompt, tokens, kdlora) | {"budget": budget}

    threads, started = [], time.perf_counter()
    for i, (at, prompt, kinds) in enumerate(load):
        time.sleep(max(0.0, started + at - time.perf_counter()))
        threads.append(threading.Thread(target=send, args=(i, prompt, budget_of(kinds, limits))))
        threads[-1].start()
    [t.join() for t in threads]
    return results, time.perf_counter() - started


def summarize(results: list[dict], quality: dict[int, float], wall_s: float) -> dict:
    def request_quality(r):
        return sum(quality[k] * n for k, n in r["spans"]) / max(1, sum(n for _, n in r["spans"]))

    def within(r):
        if r.get("rejected"):
            return False
        bound, floor = r["budget"].get("latency_ms_per_token"), r["budget"].get("min_quality")
        return (bound is None or (r["decode_ms"] is not None and r["decode_ms"] <= bound)) and (
            floor is None or min(quality[k] for k, _ in r["spans"]) >= floor
        )

    def percentile(values, q):
        values = sorted(v for v in values if v is not None)
        return values[min(len(values) - 1, int(q * len(values)))] if values else None

    served = [r for r in results if not r.get("rejected")]
    rejected = [r for r in results if r.get("rejected")]
    return {
        "requests": len(results),
        "within_budget": sum(map(within, results)) / len(results),
        "within_budget_with_budget": sum(within(r) for r in results if r["budget"])
        / max(1, sum(1 for r in results if r["budget"])),
        "mean_quality": sum(map(request_quality, served)) / max(1, len(served)),
        "mean_rank": sum(sum(k * n for k, n in r["spans"]) / max(1, r["tokens"]) for r in served) / max(1, len(served)),
        "lowered": sum(len(r["spans"]) > 1 for r in served),
        "goodput_tok_s": sum(r["tokens"] for r in results if within(r)) / wall_s,
        "miss_excess_p50_pct": percentile(
            [
                100 * (r["decode_ms"] / r["budget"]["latency_ms_per_token"] - 1)
                for r in served
                if r["budget"].get("latency_ms_per_token") and r["decode_ms"] and not within(r)
            ],
            0.5,
        ),  # fmt: skip
        "rejections": len(rejected),
        "rejection_ms_max": max((1000 * r["answered_s"] for r in rejected), default=None),
        "ttft_p50_s": percentile([r["ttft_s"] for r in served], 0.5),
        "ttft_p99_s": percentile([r["ttft_s"] for r in served], 0.99),
        "decode_p50_ms": percentile([r["decode_ms"] for r in served], 0.5),
        "decode_p99_ms": percentile([r["decode_ms"] for r in served], 0.99),
    }


def main() -> None:
    from openai import OpenAI

    from hub.schema import load_metadata

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rates", default="0.25,0.5,0.8", help="Poisson arrival rates as fractions of saturation")
    parser.add_argument("--requests", type=int, default=40, help="requests per Poisson load")
    parser.add_argument("--no-burst", action="store_true", help="skip the burst (2x saturation for 10 s)")
    parser.add_argument("--tokens", type=int, default=32)
    parser.add_argument("--saturation-concurrency", type=int, default=8)
    parser.add_argument("--on-miss", default="wait", choices=["serve", "reject", "wait"], help="batch-aware policies")
    parser.add_argument("--max-wait-ms", type=float, default=5000)
    parser.add_argument("--no-stock", action="store_true", help="skip the stock-LoRA server")
    parser.add_argument("--adapter", type=Path, default=ADAPTER, help="an adapter folder with ranks 1 and 64 evaluated")
    parser.add_argument(
        "--dtype", help="the servers' dtype (default: the one kdlora serve picks); results go to budget-<dtype>.*"
    )
    args = parser.parse_args()
    adapter = args.adapter
    if not (adapter / "kdlora.json").exists():
        raise SystemExit(f"{adapter} not found: run `.venv/bin/python benchmarks/task_bench.py --only sandwich-seed-0`")
    meta = load_metadata(adapter)
    quality = {r.rank: r.teacher_top1_agreement for r in meta.ranks}
    on_miss = {"on_miss": args.on_miss} | ({"max_wait_ms": args.max_wait_ms} if args.on_miss == "wait" else {})
    alias, rows, limits_by_load, heldout = adapter.name, [], {}, []

    proc, url = start_server(
        adapter, True, args.dtype, WORK / f"server-budget-rank-aware-{args.dtype or 'default'}.log"
    )
    try:
        client = OpenAI(base_url=url + "/v1", api_key="-", max_retries=0, timeout=600)
        for rank in sorted(quality):  # every rank resident, its first request behind us, and its decode alone
            for _ in range(2):
                stream(client, f"{alias}@r{rank}", PROMPTS[0], 4, None)
        alone = {
            k: stream(client, f"{alias}@r{k}", PROMPTS[1], args.tokens, None)["decode_ms"] for k in sorted(quality)
        }
        saturation = closed_loop_rate(client, f"{alias}@r64", args.saturation_concurrency, args.tokens)
        print(f"decode alone: {alone}; saturation {saturation:.2f} req/s", flush=True)
        loads = [(f"{f:g}", f, args.requests) for f in map(float, args.rates.split(","))]
        if not args.no_burst:
            loads.append((BURST[0], BURST[1], round(BURST[1] * saturation * BURST[2])))
        for seed, (name, fraction, count) in enumerate(loads):
            load, limits = arrivals(fraction * saturation, count, seed), {"floor": quality[sorted(quality)[-2]]}
            runs = {}
            for policy in POLICIES:  # fixed r1 and r64 first: they set this load's budgets
                fit = get_json(url + "/v1/kdlora/steps")["ms_per_step"]  # before this run: its steps are held out
                runs[policy] = run_load(client, alias, policy, load, args.tokens, limits, alone, quality, on_miss)
                heldout += [(fit, step) for step in get_json(url + "/v1/kdlora/steps")["recent"]] if fit else []
                if policy in ("fixed r1", "fixed r64"):
                    decode = sorted(r["decode_ms"] for r in runs[policy][0] if r["decode_ms"] is not None)
                    limits["tight" if policy == "fixed r1" else "loose"] = 1.1 * decode[len(decode) // 2]
            for policy, (results, wall_s) in runs.items():  # fixed ranks sent no budget: held to it here
                rows.append(
                    {
                        "load": name,
                        "rate_rps": fraction * saturation,
                        "server": "rank-aware",
                        "policy": policy,
                        "wall_s": wall_s,
                    }
                    | summarize(with_budgets(results, load, limits), quality, wall_s)  # fmt: skip
                )
                print(json.dumps(rows[-1]), flush=True)
            limits_by_load[name] = limits | {"step_fit_after": get_json(url + "/v1/kdlora/steps")["ms_per_step"]}
        rejections_ms = sorted(  # on_miss reject with a budget no rank meets: answered before any engine work
            1000
            * stream(client, alias, PROMPTS[0], args.tokens, {"latency_ms_per_token": 0.01, "on_miss": "reject"})[
                "answered_s"
            ]
            for _ in range(20)
        )
    finally:
        proc.terminate()
        proc.wait(timeout=120)
    if not args.no_stock:
        proc, url = start_server(
            adapter, False, args.dtype, WORK / f"server-budget-stock-{args.dtype or 'default'}.log"
        )
        try:
            client = OpenAI(base_url=url + "/v1", api_key="-", max_retries=0, timeout=600)
            for rank in sorted(quality):
                stream(client, f"{alias}@r{rank}", PROMPTS[0], 4, None)
            for seed, (name, fraction, count) in enumerate(loads):
                load, limits = arrivals(fraction * saturation, count, seed), limits_by_load[name]
                results, wall_s = run_load(
                    client, alias, "batch-aware", load, args.tokens, limits, alone, quality, on_miss
                )
                rows.append(
                    {
                        "load": name,
                        "rate_rps": fraction * saturation,
                        "server": "stock",
                        "policy": "batch-aware",
                        "wall_s": wall_s,
                    }
                    | summarize(results, quality, wall_s)  # fmt: skip
                )
                print(json.dumps(rows[-1]), flush=True)
        finally:
            proc.terminate()
            proc.wait(timeout=120)
    summary = {
        "machine": {"platform": platform.platform(), "cpus": os.cpu_count(), "python": platform.python_version()},
        "settings": vars(args) | {"adapter": str(args.adapter)},
        "adapter": str(adapter),
        "quality_by_rank": quality,
        "decode_alone_ms": alone,
        "saturation_rps": saturation,
        "limits_by_load": limits_by_load,
        "step_model_heldout": heldout_check(heldout),
        "reject_answer_ms": {"p50": rejections_ms[10], "max": rejections_ms[-1]},
        "rows": rows,
    }
    print("step model on held-out steps:", json.dumps(summary["step_model_heldout"]), flush=True)
    RESULTS.mkdir(parents=True, exist_ok=True)
    stem = f"budget-{args.dtype}" if args.dtype else "budget"
    (RESULTS / f"{stem}.json").write_text(json.dumps(summary, indent=1) + "\n")
    plot(summary, RESULTS / f"{stem}.png")


def get_json(url: str) -> dict:
    with urllib.request.urlopen(url) as response:
        return json.loads(response.read())


def heldout_check(pairs: list[tuple[dict, dict]]) -> dict:
    """The server's step model against steps it had not seen when fitted: each run's last 32 steps
    (GET /v1/kdlora/steps) predicted with the fit taken before that run; all of them, and the decode-only ones (no
    prompt prefilled beside them: what a budget's steady decode is priced at)."""

    def error(fit: dict, step: dict) -> float:
        predicted = fit["base"] + sum(fit.get(term, 0.0) * step.get(term, 0.0) for term in step if term != "ms")
        return abs(predicted - step["ms"]) / step["ms"]

    def percentiles(errors: list[float]) -> dict:
        errors = sorted(errors)
        if not errors:
            return {"steps": 0}
        return {
            "steps": len(errors),
            "median_abs_error_pct": 100 * errors[len(errors) // 2],
            "p90_abs_error_pct": 100 * errors[int(0.9 * len(errors))],
        }

    return percentiles([error(fit, step) for fit, step in pairs]) | {
        "decode_only": percentiles([error(fit, step) for fit, step in pairs if not step.get("prefill_tokens")])
    }


def with_budgets(results: list[dict], load, limits: dict) -> list[dict]:
    """Results held to this load's budgets (set after the fixed-rank runs, which send none)."""
    return [r | {"budget": budget_of(kinds, limits)} for r, (_, _, kinds) in zip(results, load)]


def plot(summary: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    loads = list(dict.fromkeys(r["load"] for r in summary["rows"]))
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.2), dpi=110)
    for server, policy in dict.fromkeys((r["server"], r["policy"]) for r in summary["rows"]):
        rows = {r["load"]: r for r in summary["rows"] if (r["server"], r["policy"]) == (server, policy)}
        x = [i for i, name in enumerate(loads) if name in rows]
        label, style = (
            (policy if server == "rank-aware" else f"{policy} (stock)"),
            ("o-" if server == "rank-aware" else "s--"),
        )
        axes[0].plot(x, [100 * rows[loads[i]]["within_budget"] for i in x], style, label=label)
        axes[1].plot(x, [rows[loads[i]]["mean_quality"] for i in x], style, label=label)
        axes[2].plot(x, [rows[loads[i]]["goodput_tok_s"] for i in x], style, label=label)
    for axis, title in zip(
        axes,
        ("% of requests within budget", "mean quality served (top-1 agreement)", "goodput: tokens within budget / s"),
    ):
        axis.set_xticks(range(len(loads)), [f"{name} x sat." if name != "burst" else "burst 2x" for name in loads])
        axis.set_title(title, fontsize=10)
    axes[0].axhline(99, color="gray", linestyle=":")
    axes[0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path)


if __name__ == "__main__":
    main()
