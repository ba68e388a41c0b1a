"""hub/card.py: what the adapter's and the student's cards say (links, model-index metric types, table columns)."""

import pytest
from huggingface_hub import ModelCard
from pydantic import ValidationError

from hub.card import adapter_card, rank_table, student_card
from hub.schema import ModelRef, RankMetadata, RankResult, ServingCost


def metadata(serving: bool = False) -> RankMetadata:
    cost = ServingCost(ms_per_token=12.5) if serving else None
    return RankMetadata(
        max_rank=4,
        default_rank=2,
        base_model=ModelRef(id="kd/student"),
        ranks=[
            RankResult(rank=1, kl_to_teacher=0.5, teacher_top1_agreement=0.8),
            RankResult(rank=4, kl_to_teacher=0.25, teacher_top1_agreement=0.9, serving=cost),
        ],
    )


def test_a_hub_id_is_linked_and_a_local_path_is_not(tmp_path):
    local = str(tmp_path / "student")
    assert "[kd/student](https://huggingface.co/kd/student)" in str(adapter_card(metadata(), "kd/a", "kd/student"))
    card = str(adapter_card(metadata(), "a", local))
    assert f"for `{local}`, trained" in card and "huggingface.co" not in card.split("---", 2)[2]
    assert "A student of `./teacher`, made" in str(student_card("s", "./teacher", None))
    assert "A student of [org/t](https://huggingface.co/org/t), made" in str(student_card("s", "org/t", None))


def test_teacher_agreement_is_not_labelled_accuracy():
    card = ModelCard(str(adapter_card(metadata(), "kd/a", "kd/student")))
    types = {(r.metric_type, r.metric_config, r.metric_value) for r in card.data.eval_results}
    assert ("teacher_top1_agreement", "rank=4", 0.9) in types
    assert not any(metric_type == "accuracy" for metric_type, _, _ in types)


def test_the_served_cost_column_appears_only_where_a_rank_was_measured():
    assert rank_table(metadata()).splitlines()[:3] == [
        "| rank | KL to teacher (nats/token) | top-1 agreement with teacher | perplexity | adapter MB |",
        "| --- | --- | --- | --- | --- |",
        "| 1 | 0.5 | 0.8 | – | – |",
    ]
    assert rank_table(metadata(serving=True)).splitlines()[2:] == [
        "| 1 | 0.5 | 0.8 | – | – | – |",
        "| 4 | 0.25 | 0.9 | – | – | 12.5 |",
    ]


def test_the_card_shows_the_prompt_format_and_a_snippet_that_sends_it():
    from hub.schema import UsageExample

    meta = metadata()
    chat = str(adapter_card(meta, "kd/a", "kd/student"))
    assert "## Prompt format" not in chat and '"content": "Hi"' in chat  # documents data: no example to show
    meta.usage_example = UsageExample(prompt='Headline: "Rates rise"\nTopic:', completion=" business")
    card = str(adapter_card(meta, "kd/a", "kd/student"))
    assert '```text\nHeadline: "Rates rise"\nTopic:\n```\nExpected answer: ` business`' in card
    snippet = card.split("```python\n")[1].split("```")[0]
    assert snippet.splitlines()[3:] == [
        "prompt = 'Headline: \"Rates rise\"\\nTopic:'",
        'answer = client.completions.create(model="kd/a@r2", prompt=prompt, max_tokens=16, temperature=0)',
        'print(answer.choices[0].text)  # expected: " business"',
    ]
    namespace = {}
    exec(snippet.splitlines()[3], namespace)  # the snippet's prompt is the example's, exactly
    assert namespace["prompt"] == meta.usage_example.prompt


def test_the_cards_code_is_formatted_as_the_project_formats_python():
    """A card's snippet gets pasted; and a quickstart run with `--out` inside a checkout leaves cards where
    `scripts/test` runs `ruff format --check`, which reads Markdown's code blocks too (a card once failed it)."""
    import subprocess
    import sys

    from hub.schema import UsageExample

    meta = metadata()
    for example in (None, UsageExample(prompt='Headline: "Rates rise"\nTopic:', completion=" business")):
        meta.usage_example = example
        snippet = str(adapter_card(meta, "kd/a", "kd/student")).split("```python\n")[1].split("```")[0]
        check = [sys.executable, "-m", "ruff", "format", "--diff", "--stdin-filename", "snippet.py", "-"]
        diff = subprocess.run(check, input=snippet, capture_output=True, text=True)
        assert diff.returncode == 0, diff.stdout + diff.stderr


def test_task_metrics_carry_their_interval_and_the_paired_rank_gain(tmp_path):
    from hub.card import plot_quality_vs_rank
    from hub.intervals import interval, paired_difference
    from hub.schema import Quality

    rank1 = [1.0] * 150 + [0.0] * 44 + [0.0] * 20 + [1.0] * 8  # 158 of 222 right
    rank4 = [1.0] * 150 + [0.0] * 44 + [1.0] * 20 + [0.0] * 8  # 170: 20 articles gained, 8 lost
    meta = metadata()
    for result, scores in zip(meta.ranks, (rank1, rank4)):
        result.task_metrics = {"accuracy": sum(scores) / len(scores)}
        result.task_outcomes = {"accuracy": scores}
    meta.base_quality = Quality(task_metrics={"accuracy": 0.2})  # no per-example scores: the mean alone
    table = rank_table(meta).splitlines()
    assert table[0].endswith("| accuracy | adapter MB |") and table[2].split(" | ")[4] == "0.2"
    assert (
        table[3].split(" | ")[4]
        == str(interval(rank1))
        == f"0.712 [{interval(rank1).low:.3f}, {interval(rank1).high:.3f}]"
    )
    card = str(adapter_card(meta, "kd/a", "kd/student"))
    gain = paired_difference(rank4, rank1)
    assert gain.low > 0  # beyond noise, though the two ranks' own intervals overlap
    assert (
        f"rank 4 vs rank 1, paired over the same 222 held-out examples: accuracy {gain.signed()} (95% interval): "
        "rank buys accuracy beyond noise." in card
    )
    assert plot_quality_vs_rank(meta, tmp_path / "plot.png").stat().st_size > 0
    meta.ranks[1].task_outcomes = {"accuracy": rank1[:-1] + [0.0]}  # 157 of 222 does not average to 170 / 222
    with pytest.raises(ValidationError, match=r"task_outcomes\['accuracy'\] \(222 scores\) does not average to"):
        RankResult.model_validate(meta.ranks[1].model_dump())
    meta.ranks[1].task_outcomes = {"accuracy": rank4[:-1]}  # 221 articles beside 222: nothing to pair
    meta.ranks[1].task_metrics = {"accuracy": sum(rank4[:-1]) / 221}
    with pytest.raises(
        ValidationError, match=r"task_outcomes\['accuracy'\] covers different numbers of examples: \[221, 222\]"
    ):
        RankMetadata.model_validate(meta.model_dump())
