"""`kdlora serve` start-up before vLLM's own process: the launcher as it is vs with the vLLM imports it had before
f52a744 (the stat-logger plugin class reached through store -> policy -> steps, and `vllm.platforms` for the CPU-build
test). Both are fresh Python processes building the same vLLM command line for the same adapter, alternated --runs
times in one run (this machine is shared: compare the two columns, not the digits). Writes JSON + PNG to
benchmarks/results/. Usage:

    .venv/bin/python benchmarks/launcher_bench.py [--runs 5]
"""

import argparse
import json
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from distill_bench import RESULTS

BUILD = "from kdlora_serve.serve import serve_command; serve_command([{adapter!r}], '127.0.0.1', 8000, 4, [], [])"
OLD_IMPORTS = "import vllm.v1.metrics.loggers; from vllm.platforms import current_platform; current_platform.is_cpu(); "
LAUNCHERS = {"now": BUILD, "with the vLLM imports (before f52a744)": OLD_IMPORTS + BUILD}


def tiny_adapter(out: Path) -> Path:
    """What serve_command reads of an adapter: adapter_config.json and kdlora.json (no weights)."""
    from peft import LoraConfig

    from hub.schema import ModelRef, RankMetadata

    LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj"]).save_pretrained(out)
    RankMetadata(max_rank=8, default_rank=4, base_model=ModelRef(id="org/student")).save(out)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=5)
    args = parser.parse_args()
    seconds = {name: [] for name in LAUNCHERS}
    with tempfile.TemporaryDirectory() as tmp:
        adapter = tiny_adapter(Path(tmp))
        for run in range(args.runs):
            for name, code in LAUNCHERS.items():  # alternated: drift on a shared machine hits both alike
                start = time.perf_counter()
                subprocess.run([sys.executable, "-c", code.format(adapter=str(adapter))], check=True)
                seconds[name].append(time.perf_counter() - start)
                print(f"run {run + 1}/{args.runs} {name}: {seconds[name][-1]:.2f} s", flush=True)
    summary = {
        "machine": platform.processor() or platform.machine(),
        "runs": args.runs,
        "seconds": seconds,
        "median_s": {name: statistics.median(values) for name, values in seconds.items()},
    }
    print(json.dumps(summary["median_s"]))
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "launcher.json").write_text(json.dumps(summary, indent=1) + "\n")
    plot(seconds, RESULTS / "launcher.png")


def plot(seconds: dict, out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3))
    for y, values in enumerate(seconds.values()):
        ax.scatter(values, [y] * len(values), alpha=0.6)
        ax.plot([statistics.median(values)] * 2, [y - 0.25, y + 0.25], color="black")
    ax.set_yticks(range(len(seconds)), list(seconds))
    ax.set_xlabel("seconds to build the vLLM command (fresh process; line: median)")
    ax.set_xlim(left=0)
    fig.tight_layout()
    fig.savefig(out, dpi=120)


if __name__ == "__main__":
    main()
