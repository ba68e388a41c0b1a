"""A nested rank's cost: rank b computed with the first b components of A and B (kdlora's `NestedRank` since
2026-12-04) vs with all R of them and the components >= b zeroed (kdlora before; the same numbers, bit for bit).

The quickstart's adapter recipe (`kdlora distill --train qdylora --quantize nf4`, all-linear rank 64, in the dtype the
quickstart picks on this CPU, or --dtype: fp32 is what it picks on AVX2-only CPUs) on the embedded SmolLM2-135M, 8 BBC News rows: a training pass (forward + backward;
a sandwich step makes three, at rank 64, rank 1 and one between) and an evaluation forward (the quickstart evaluates
ranks 1 ... 64 and the student alone, rank 0), at several ranks. The masked reference also has PEFT's input cast
(bf16 -> fp32 -> bf16 under CPU autocast), which `NestedRank` skips. The two alternate --runs times in one run
(the machine is shared: compare the columns, not the digits); every rank's logits are compared between them.
Writes JSON + PNG to benchmarks/results/. Usage:

    .venv/bin/python benchmarks/nested_rank_bench.py [--runs 5] [--dtype fp32|bf16]
"""

import argparse
import json
import platform
import statistics
import sys
import time
from pathlib import Path

from distill_bench import RESULTS, write_side_by_side

WAYS = ("masked", "sliced")
TRAIN_RANKS, EVAL_RANKS = (64, 8, 1), (64, 8, 1, 0)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--dtype", choices=("fp32", "bf16"), help="default: the quickstart's pick on this CPU")
    args = parser.parse_args()
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    import torch

    from kdlora_serve.engine import native_bf16
    from kdlora_serve.quickstart import training_dtype
    from training.data import load_token_data, trimmed
    from training.distill import build_student, mixed_precision
    from training.distill_config import DistillConfig
    from training.losses import final_hidden_states
    from training.nested_lora import NestedRank
    from training.teacher import embedded_teacher

    cfg = DistillConfig(
        student=str(embedded_teacher()), out=RESULTS / "unused", data="builtin:bbc-news", train="qdylora",
        max_rank=64, quantize="nf4", dtype=args.dtype or training_dtype(), seq_len=128, batch_size=8,
    )  # fmt: skip
    device = torch.device("cpu")
    model, tokenizer, nested = build_student(cfg, device)
    data = load_token_data(cfg.data, tokenizer, cfg.seq_len)
    batch, _ = trimmed(data.train[:8], data.train_mask[:8])
    state = {"nested": nested, "rank": 64, "hooks": []}

    def mask(module, args, out):  # kdlora before 2026-12-04: all R components computed, those >= b zeroed
        return out * (torch.arange(out.shape[-1]) < state["rank"]).to(out.dtype)

    def use(way: str) -> None:
        if way == "masked" and state["nested"] is not None:
            state["nested"].remove()
            state["nested"] = None
            state["hooks"] = [layer.lora_A["default"].register_forward_hook(mask) for layer in nested.layers]
        if way == "sliced" and state["nested"] is None:
            for hook in state["hooks"]:
                hook.remove()
            state["nested"] = NestedRank(model)

    def at_rank(rank: int) -> None:
        if state["nested"] is not None:
            state["nested"].set(rank)
            return
        state["rank"] = rank
        for layer in nested.layers:  # NestedRank's scaling, alpha / sqrt(b)
            layer.scaling["default"] = nested._scale(layer.lora_alpha["default"], max(rank, 1))

    def forward(rank: int, train: bool):
        at_rank(rank)
        model.train(train)
        with torch.set_grad_enabled(train), mixed_precision(cfg, device), final_hidden_states(model):
            hidden = model(batch).logits
        if train:
            hidden[:, -1].float().logsumexp(-1).mean().backward()
            model.zero_grad(set_to_none=True)
        return hidden.detach()

    works = {f"train pass r{r}": (r, True) for r in TRAIN_RANKS} | {f"eval r{r}": (r, False) for r in EVAL_RANKS}
    seconds = {work: {way: [] for way in WAYS} for work in works}
    identical = {}
    for work, (rank, train) in works.items():
        outputs = {}
        for way in WAYS:  # warm-up, and the outputs compared
            use(way)
            outputs[way] = forward(rank, train)
        identical[work] = torch.equal(outputs["masked"], outputs["sliced"])
        for _ in range(args.runs):
            for way in WAYS:
                use(way)
                started = time.perf_counter()
                forward(rank, train)
                seconds[work][way].append(time.perf_counter() - started)
        print(work, {way: round(statistics.median(s), 3) for way, s in seconds[work].items()}, flush=True)
    medians = {w: {way: statistics.median(v) for way, v in by.items()} for w, by in seconds.items()}
    summary = {
        "machine": {"platform": platform.platform(), "native_bf16": native_bf16(), "torch": torch.__version__},
        "dtype": cfg.dtype,
        "batch": list(batch.shape),
        "runs": args.runs,
        "seconds": seconds,
        "median_seconds": medians,
        "masked_over_sliced": {w: m["masked"] / m["sliced"] for w, m in medians.items()},
        "identical_outputs": identical,
    }
    write_side_by_side(
        f"nested_rank-{cfg.dtype}",
        summary,
        {"masked": "R components, those >= b zeroed", "sliced": "b components"},
        f"NF4 SmolLM2-135M + LoRA R=64, {cfg.dtype}, {batch.shape[0]}x{batch.shape[1]} tokens, median of {args.runs}",
    )
    print(json.dumps({k: summary[k] for k in ("machine", "masked_over_sliced", "identical_outputs")}, indent=1))


if __name__ == "__main__":
    main()
