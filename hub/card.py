"""Model cards: the adapter's (per-rank results as `model-index`, a table, a quality-vs-rank plot)
and the student's (`base_model` = teacher, the pruning report). Lineage: teacher -> student -> adapter."""

import json
import re
from pathlib import Path

from hub.schema import RankMetadata

PLOT_FILE = "quality_vs_rank.png"
# (metadata field, model-index metric type, table header); one entry per quality number kdlora records
_METRICS = [
    ("kl_to_teacher", "kl_divergence", "KL to teacher (nats/token)"),
    ("teacher_top1_agreement", "teacher_top1_agreement", "top-1 agreement with teacher"),  # not a task's accuracy
    ("perplexity", "perplexity", "perplexity"),
]


_HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[\w.-]+")


def model_link(model: str) -> str:
    """Markdown for a model: a Hub link for an `org/name` id, the plain name for anything else (a local path has
    no page on the Hub)."""
    if _HUB_ID.fullmatch(model) and not Path(model).exists():
        return f"[{model}](https://huggingface.co/{model})"
    return f"`{model}`"


def task_metric_names(metadata: RankMetadata) -> list[str]:
    """The task metrics any evaluated rank (or the base) records, sorted: one more column / line each."""
    results = [*metadata.ranks, *([metadata.base_quality] if metadata.base_quality else [])]
    return sorted({name for result in results for name in result.task_metrics})


def plot_quality_vs_rank(metadata: RankMetadata, path: Path) -> Path | None:
    """KL to teacher, top-1 agreement and the task metrics against rank (log2 axis); None when nothing was evaluated."""
    points = [r for r in metadata.ranks if r.kl_to_teacher is not None or r.teacher_top1_agreement is not None]
    if not points:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, kl_axis = plt.subplots(figsize=(6, 4.2), dpi=120)
    ranks = [r.rank for r in points]
    nan = float("nan")  # a rank missing one of the two numbers leaves a gap, not an error
    kl_axis.plot(
        ranks,
        [nan if r.kl_to_teacher is None else r.kl_to_teacher for r in points],
        "o-",
        color="tab:red",
        label="KL to teacher (lower is better)",
    )
    kl_axis.set_xscale("log", base=2)
    kl_axis.set_xticks(ranks, [str(r) for r in ranks])
    kl_axis.set_xlabel("adapter rank (one nested adapter, truncated)")
    kl_axis.set_ylabel("KL(teacher || student), nats/token", color="tab:red")
    agreement_axis = kl_axis.twinx()
    agreement_axis.plot(
        ranks,
        [nan if r.teacher_top1_agreement is None else r.teacher_top1_agreement for r in points],
        "s--",
        color="tab:blue",
        label="top-1 agreement (higher is better)",
    )
    for name, color in zip(
        task_metric_names(metadata), ("tab:green", "tab:orange", "tab:purple", "tab:brown", "tab:gray")
    ):
        estimates = [r.interval(name) for r in points]
        means = [r.task_metrics.get(name, nan) for r in points]
        agreement_axis.errorbar(  # the 95% interval where per-example scores were kept, no bar where not
            ranks,
            means,
            yerr=error_bars(means, estimates),
            fmt="^--",
            color=color,
            capsize=3,
            label=f"{name} (higher is better)" + (", 95% interval" if any(estimates) else ""),
        )
    agreement_axis.set_ylabel("agreement / task metrics (0-1)", color="tab:blue")
    kl_axis.set_title(f"quality vs rank, base {metadata.base_model.id}", fontsize=9)
    legend_rows = -(-len(fig.axes[0].lines + fig.axes[1].lines) // 2)
    fig.legend(loc="lower center", bbox_to_anchor=(0.5, 0.0), ncol=2, fontsize=8, frameon=False)
    fig.tight_layout(rect=(0, 0.06 * legend_rows, 1, 1))  # room for the legend below the axis label
    fig.savefig(path)
    plt.close(fig)
    return Path(path)


def error_bars(means: list[float], estimates: list) -> list[list[float]]:
    """matplotlib's `yerr` for 95% intervals (hub.intervals.Estimate or None: no bar) around `means`. Clamped at 0:
    a mean summed in another order can sit a rounding error outside its interval, and matplotlib refuses a
    negative bar."""
    nan = float("nan")
    return [
        [nan if e is None else max(0.0, m - e.low) for m, e in zip(means, estimates)],
        [nan if e is None else max(0.0, e.high - m) for m, e in zip(means, estimates)],
    ]


def rank_table(metadata: RankMetadata) -> str:
    """Markdown table, one row per evaluated rank (also what `kdlora hub inspect` prints)."""
    tasks = task_metric_names(metadata)
    served = any(result.serving for result in metadata.ranks)  # the column only where a serving cost was measured
    unserved = ["–"] if served else []
    header = [
        "rank",
        *(title for _, _, title in _METRICS),
        *tasks,
        "adapter MB",
        *(["ms/token (served)"] if served else []),
    ]
    rows = [header, ["---"] * len(header)]
    if metadata.base_quality is not None:
        base = metadata.base_quality
        rows.append(
            [
                "0 (no adapter)",
                *(_fmt(getattr(base, field)) for field, _, _ in _METRICS),
                *(_task_cell(base, t) for t in tasks),
                "0",
                *unserved,
            ]
        )
    if metadata.teacher_quality is not None and metadata.teacher_quality.task_metrics:
        rows.append(
            [
                "teacher",
                *(["–"] * len(_METRICS)),
                *(_task_cell(metadata.teacher_quality, t) for t in tasks),
                "–",
                *unserved,
            ]
        )
    for result in metadata.ranks:
        cells = [str(result.rank) + (" (default)" if result.rank == metadata.default_rank else "")]
        cells += [_fmt(getattr(result, field)) for field, _, _ in _METRICS] + [_task_cell(result, t) for t in tasks]
        cells.append(_fmt(result.adapter_bytes / 1e6 if result.adapter_bytes is not None else None))
        if served:
            cells.append(_fmt(result.serving.ms_per_token if result.serving else None))
        rows.append(cells)
    return "\n".join("| " + " | ".join(row) + " |" for row in rows)


def _fmt(value) -> str:
    return "–" if value is None else f"{value:.4g}"


def _task_cell(quality, metric: str) -> str:
    """A task metric, with its 95% interval where per-example scores were kept: `0.752 [0.694, 0.806]`."""
    estimate = quality.interval(metric)
    return str(estimate) if estimate else _fmt(quality.task_metrics.get(metric))


def rank_gain(metadata: RankMetadata, metric: str) -> str | None:
    """One line: does the top evaluated rank beat rank 1's `metric` beyond noise? Paired over the same held-out
    examples (hub/intervals.py); None without two ranks' per-example scores."""
    from hub.intervals import paired_difference

    if len(metadata.ranks) < 2:
        return None
    low, top = metadata.ranks[0], metadata.ranks[-1]
    scores = [r.scores(metric) for r in (top, low)]
    if not all(scores):
        return None
    difference = paired_difference(*scores)
    if not difference.excludes_zero():
        verdict = "no difference beyond noise"
    else:
        verdict = f"rank buys {metric} beyond noise" if difference.low > 0 else f"rank {top.rank} is worse beyond noise"
    return (
        f"rank {top.rank} vs rank {low.rank}, paired over the same {len(scores[0])} held-out examples: {metric} "
        f"{difference.signed()} (95% interval): {verdict}"
    )


def adapter_card(metadata: RankMetadata, repo_id: str, base_model: str, plot: str | None = PLOT_FILE):
    """The adapter repo's README.md as a `huggingface_hub.ModelCard`."""
    from huggingface_hub import EvalResult, ModelCard, ModelCardData

    dataset = metadata.recipe.data if metadata.recipe and metadata.recipe.data else "held-out"
    results = [
        EvalResult(
            task_type="text-generation",
            dataset_type=dataset,
            dataset_name=f"{dataset} (held-out split)",
            metric_type=metric_type,
            metric_name=title,
            metric_value=float(getattr(result, field)),
            metric_config=f"rank={result.rank}",
        )
        for result in metadata.ranks
        for field, metric_type, title in _METRICS
        if getattr(result, field) is not None
    ] + [
        EvalResult(
            task_type="text-generation",
            dataset_type=dataset,
            dataset_name=f"{dataset} (held-out split)",
            metric_type=name,
            metric_name=name,
            metric_value=float(value),
            metric_config=f"rank={result.rank}",
        )
        for result in metadata.ranks
        for name, value in sorted(result.task_metrics.items())
    ]
    data = ModelCardData(
        base_model=base_model,
        library_name="peft",
        pipeline_tag="text-generation",
        tags=["kdlora", "lora", "peft", "nested-rank", "dylora", "knowledge-distillation"],
        model_name=repo_id,
        eval_results=results or None,
        kdlora={
            "max_rank": metadata.max_rank,
            "default_rank": metadata.default_rank,
            "teacher": metadata.teacher.id if metadata.teacher else None,
        },
    )
    recipe = metadata.recipe.model_dump(exclude_none=True) if metadata.recipe else {}
    body = f"""
# {repo_id}

One **nested-rank LoRA adapter** for {model_link(base_model)}, trained with
kdlora by knowledge distillation from
{f"`{metadata.teacher.id}`" if metadata.teacher else "its teacher"}. Every rank 1..{metadata.max_rank} works:
rank k is the first k rank components (`lora_A[:k]`, `lora_B[:, :k]`, `r=k`, same `lora_alpha` and `use_rslora`).
Default rank: {metadata.default_rank}.

## Quality per rank (held-out)

{rank_table(metadata) if metadata.ranks else "No ranks were evaluated."}
{evidence(metadata)}{f"{chr(10)}![quality vs rank]({plot}){chr(10)}" if plot else ""}
{_prompt_format(metadata)}## Use it

Serve every rank from one vLLM process with kdlora and pick the rank per request:

```bash
kdlora serve --adapter {repo_id}
```
```python
{_usage_snippet(metadata, repo_id)}
```

Without kdlora: `kdlora hub truncate {repo_id} --rank K --out DIR` or a pre-truncated `r<k>/` folder
(if present) is a plain PEFT adapter; the repo root is the rank-{metadata.max_rank} adapter.

## Training recipe

```json
{_json(recipe)}
```
"""
    return ModelCard(f"---\n{data.to_yaml()}\n---\n{body}")


def evidence(metadata: RankMetadata) -> str:
    """Below `rank_table`: what its intervals are, and whether rank buys each task metric beyond noise ("" without
    per-example scores)."""
    tasks = [t for t in task_metric_names(metadata) if any(t in (r.task_outcomes or {}) for r in metadata.ranks)]
    if not tasks:
        return ""
    lines = ["", "Task metrics: mean over the held-out examples [95% bootstrap interval over examples]."]
    lines += [f"{line}." for t in tasks if (line := rank_gain(metadata, t))]
    return "\n".join(lines) + "\n"


def _prompt_format(metadata: RankMetadata) -> str:
    """The card's prompt-format section: one held-out example as the adapter was trained on it ("" without one)."""
    example = metadata.usage_example
    if example is None:
        return ""
    return f"""## Prompt format

Trained on prompts like this held-out one (the answer it was trained to give follows the prompt directly):

```text
{example.prompt}
```
Expected answer: `{example.completion}`

"""


def _usage_snippet(metadata: RankMetadata, repo_id: str) -> str:
    """Python that asks the served adapter for its default rank: the held-out example's prompt where there is one."""
    model = f"{repo_id}@r{metadata.default_rank}"
    lines = ["from openai import OpenAI", "", 'client = OpenAI(base_url="http://127.0.0.1:8000/v1", api_key="-")']
    example = metadata.usage_example
    if example is None:
        return "\n".join(
            [*lines, f'client.chat.completions.create(model="{model}", messages=[{{"role": "user", "content": "Hi"}}])']
        )
    return "\n".join(
        [
            *lines,
            f"prompt = {_python_string(example.prompt)}",
            f'answer = client.completions.create(model="{model}", prompt=prompt, max_tokens=16, temperature=0)',
            f"print(answer.choices[0].text)  # expected: {json.dumps(example.completion)}",
        ]
    )


def _python_string(text: str) -> str:
    """`text` as a Python literal the way ruff and black write it: in double quotes, unless it holds more of them
    than single quotes (`repr` then takes single ones)."""
    return repr(text) if text.count('"') > text.count("'") else json.dumps(text, ensure_ascii=False)


def student_card(repo_id: str, teacher: str, report: dict | None):
    """The student repo's README.md: a pruned (and distilled) teacher, with its pruning report."""
    from huggingface_hub import ModelCard, ModelCardData

    data = ModelCardData(
        base_model=teacher,
        library_name="transformers",
        pipeline_tag="text-generation",
        tags=["kdlora", "pruned", "minitron", "knowledge-distillation"],
        model_name=repo_id,
    )
    body = f"""
# {repo_id}

A student of {model_link(teacher)}, made by kdlora:
Minitron-style structured pruning (heads, MLP neurons, embedding channels, layers ranked by activation
importance) followed by knowledge distillation. It loads with `AutoModelForCausalLM` and vLLM.

## Pruning report

```json
{_json(report or {"note": "no pruning report was supplied"})}
```
"""
    return ModelCard(f"---\n{data.to_yaml()}\n---\n{body}")


def _json(value) -> str:
    return json.dumps(value, indent=2)
