"""The sandwich step's ranks (64, 16, 1) as three forward/backward passes, as `kdlora distill` trains them, vs as
ONE pass of the batch repeated per rank, each row's LoRA components masked to its rank and scaled by it. A
measurement for a change not built (benchmarks/RESULTS.md, "Another AVX512-BF16 host"): the batched pass is
patched into `NestedRank`'s down-projection here, nowhere else. NF4 base + all-linear LoRA r64 as the quickstart
builds it (`training.distill.build_student`), 8 rows, the loss on each row's last token through the LM head, in the
dtype the quickstart picks on this CPU. Also reports how far the two ways' gradients differ. The ways alternate
--runs times in one run (the machine is shared: compare the columns, not the digits). Writes JSON + PNG to
benchmarks/results/. Usage:

    .venv/bin/python benchmarks/sandwich_batch_bench.py [--student DIR] [--runs 4] [--tokens 110]
"""

import argparse
import platform
import statistics
import sys
import time
from functools import partial
from pathlib import Path

from distill_bench import write_side_by_side

RANKS = (64, 16, 1)
ROWS = 8


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--student", type=Path, help="student checkpoint (default: the embedded teacher)")
    parser.add_argument("--runs", type=int, default=4)
    parser.add_argument("--tokens", type=int, default=110)
    args = parser.parse_args()
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    import torch

    from kdlora_serve.quickstart import training_dtype
    from training.distill import DistillConfig, build_student
    from training.losses import final_hidden_states
    from training.teacher import embedded_teacher

    dtype = training_dtype()
    student = args.student or embedded_teacher()
    cfg = DistillConfig(  # what build_student reads; nothing is written to `out`
        student=str(student), out=Path("unused"), train="qdylora", max_rank=max(RANKS), quantize="nf4", dtype=dtype
    )
    model, _, nested = build_student(cfg, torch.device("cpu"))
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    torch.manual_seed(0)
    batch = torch.randint(0, model.config.vocab_size, (ROWS, args.tokens))
    autocast = partial(torch.autocast, "cpu", dtype=torch.bfloat16, enabled=dtype == "bf16")

    row_weights = {}  # set: each row's components masked to its rank, times its scale (batched)
    masked_down = nested._down

    def down(lora_a, x):
        if not row_weights:
            return masked_down(lora_a, x)
        return torch.nn.functional.linear(x, lora_a.weight) * row_weights["w"].to(x.dtype)

    for layer in nested.layers:
        lora_a = layer.lora_A[nested.adapter]
        lora_a.forward = partial(down, lora_a)

    def loss_of(hidden, head):
        return head(hidden).float().logsumexp(-1).mean()

    def sequential():
        row_weights.clear()
        for rank in RANKS:
            nested.set(rank)
            with autocast(), final_hidden_states(model) as head:
                loss = loss_of(model(batch).logits[:, -1], head)
            loss.backward()

    def batched():
        nested.set(max(RANKS))
        for layer in nested.layers:
            layer.scaling[nested.adapter] = layer.lora_alpha[nested.adapter]  # the scale is in the row weights
        ranks = torch.tensor(RANKS).repeat_interleave(ROWS)
        mask = torch.arange(max(RANKS))[None] < ranks[:, None]
        row_weights["w"] = (mask * nested._scale(1.0, ranks.float())[:, None])[:, None, :]
        with autocast(), final_hidden_states(model) as head:
            hidden = model(batch.repeat(len(RANKS), 1)).logits[:, -1]
            loss = sum(loss_of(group, head) for group in hidden.split(ROWS))
        loss.backward()

    ways = {"three passes": sequential, "one batched pass": batched}

    def gradients(step):
        for p in params:
            p.grad = None
        step()
        return [p.grad.float().clone() for p in params]

    reference, other = gradients(sequential), gradients(batched)  # also the warm-up
    differences = [((a - b).norm() / a.norm()).item() for a, b in zip(reference, other) if a.norm() > 0]
    seconds = {"step": {way: [] for way in ways}}
    for _ in range(args.runs):
        for way, step in ways.items():
            for p in params:
                p.grad = None
            started = time.perf_counter()
            step()
            seconds["step"][way].append(time.perf_counter() - started)
    median = {way: statistics.median(times) for way, times in seconds["step"].items()}
    summary = {
        "machine": {"platform": platform.platform(), "torch": torch.__version__},
        "dtype": dtype,
        "student": str(student),
        "ranks": RANKS,
        "rows": ROWS,
        "tokens": args.tokens,
        "runs": args.runs,
        "seconds": seconds,
        "median_seconds": {"step": median},
        "speedup": median["three passes"] / median["one batched pass"],
        "gradient_relative_difference": {"max": max(differences), "median": statistics.median(differences)},
    }
    write_side_by_side(
        f"sandwich-batch-{dtype}",
        summary,
        {way: way for way in ways},
        f"ranks {RANKS}, {ROWS} rows x {args.tokens} tokens, NF4 + LoRA r64, {dtype}: median of {args.runs}",
    )
    print({k: summary[k] for k in ("dtype", "median_seconds", "speedup", "gradient_relative_difference")})


if __name__ == "__main__":
    main()
