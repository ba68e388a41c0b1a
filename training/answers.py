"""`kdlora teacher answers`: the teacher's answers to a set of prompts, generated once with vLLM's offline
batch engine and cached as JSONL, for sequence-level KD (Kim & Rush, arXiv 1606.07947: the student learns
the teacher's own outputs; `kdlora distill --data answers.jsonl` trains on the answer tokens only).

Prompts: a JSONL file of `{"prompt": "..."}` records (answered as plain text) or `{"messages": [...]}`
records (a chat, answered through the teacher's chat template). Each output line is the input record
with the answer added (`completion`, or a final assistant message) and its `index`.

Deterministic and resumable: greedy by default; with `--temperature` > 0 every prompt samples with its
own seed (seed, index), so the answers do not depend on batching or on where a run was interrupted.
Lines are appended to `<out>.partial` chunk by chunk (fsynced); a rerun continues after the last whole
line, and `<out>` appears only when every prompt is answered.
"""

import hashlib
import json
import os
import sys
from pathlib import Path

from hub.atomic import refuse_other_settings
from hub.errors import KdloraError

CHUNK = 256  # prompts per engine call: big enough to batch well, small enough to lose little on a crash


def read_prompts(path: Path) -> list[dict]:
    """The prompt records of a JSONL file, each `{"prompt": str}` or `{"messages": [...]}` (a chat not yet answered)."""
    if not path.is_file():
        raise KdloraError(
            f'prompts file {path} does not exist; give a JSONL file of {{"prompt": ...}} or {{"messages": [...]}} records'
        )
    from training.data import read_jsonl

    records = []
    for number, record in read_jsonl(path):
        chat = isinstance(record, dict) and isinstance(record.get("messages"), list) and record["messages"]
        if not (isinstance(record, dict) and (isinstance(record.get("prompt"), str) or chat)):
            raise KdloraError(f'{path}:{number}: expected {{"prompt": "..."}} or {{"messages": [...]}}')
        if chat and record["messages"][-1].get("role") == "assistant":
            raise KdloraError(
                f"{path}:{number}: the chat already ends with an assistant message; the teacher answers the user's last turn"
            )
        records.append(record)
    if not records:
        raise KdloraError(f"prompts file {path} has no records")
    if len({"messages" in r for r in records}) > 1:
        raise KdloraError(f"prompts file {path} mixes chat and plain records; use one kind per file")
    return records


def answer_prompts(
    prompts_path: Path,
    out: Path,
    teacher: str | None = None,
    max_tokens: int = 128,
    temperature: float = 0.0,
    seed: int = 0,
    engine=None,
) -> Path:
    """Write the teacher's answers to every prompt of `prompts_path` into `out` (JSONL); resumes `<out>.partial`.
    `engine`: a `vllm.LLM` already holding the teacher (tests share one); None starts one."""
    from tqdm.auto import tqdm

    if out.exists():
        raise KdloraError(f"{out} already exists; answers are written once; delete it or choose another --out")
    if max_tokens < 1 or temperature < 0:
        raise KdloraError(
            f"--max-tokens must be at least 1 and --temperature at least 0 (got {max_tokens}, {temperature})"
        )
    records = read_prompts(prompts_path)
    partial, settings_file = Path(f"{out}.partial"), Path(f"{out}.partial.json")
    settings = {
        "prompts_sha256": hashlib.sha256(prompts_path.read_bytes()).hexdigest(),
        "teacher": teacher,
        "max_tokens": max_tokens,
        "temperature": temperature,
        "seed": seed,
    }
    done = _resume(partial, settings_file, settings)
    if done:
        print(f"resuming: {done} of {len(records)} prompts already answered in {partial}", file=sys.stderr)
    if done < len(records):
        engine = engine or _start_engine(teacher)
        with (
            open(partial, "a", encoding="utf-8") as sink,
            tqdm(total=len(records), initial=done, desc="teacher answers") as bar,
        ):
            for start in range(done, len(records), CHUNK):
                chunk = records[start : start + CHUNK]
                answers = _generate(engine, chunk, range(start, start + len(chunk)), max_tokens, temperature, seed)
                sink.write(
                    "".join(
                        json.dumps(_answered(r, i, a), ensure_ascii=False) + "\n"
                        for i, (r, a) in enumerate(zip(chunk, answers), start)
                    )
                )
                sink.flush()
                os.fsync(sink.fileno())
                bar.update(len(chunk))
    os.replace(partial, out)
    settings_file.unlink(missing_ok=True)
    return out


def _resume(partial: Path, settings_file: Path, settings: dict) -> int:
    """How many prompts `partial` already answers (0 when starting); refuses a partial file made with other settings."""
    if not partial.exists():
        partial.parent.mkdir(parents=True, exist_ok=True)
        settings_file.write_text(json.dumps(settings))
        return 0
    refuse_other_settings(partial, settings_file, settings, "answers")
    text = partial.read_text(encoding="utf-8")
    whole = text[: text.rfind("\n") + 1]  # a line cut by a crash is dropped and answered again
    partial.write_text(whole, encoding="utf-8")
    return whole.count("\n")


def _start_engine(teacher: str | None):
    import torch
    from vllm import LLM

    from training.teacher import embedded_teacher

    model = teacher or str(embedded_teacher())
    # fp32 on CPUs: the cached targets should not depend on a CPU's bf16 support; GPUs use the checkpoint's dtype
    return LLM(
        model=model,
        dtype="auto" if torch.cuda.is_available() else "float32",
        seed=0,
        enforce_eager=not torch.cuda.is_available(),
    )


def _generate(engine, records: list[dict], indices, max_tokens: int, temperature: float, seed: int) -> list[str]:
    from vllm import SamplingParams

    params = [
        SamplingParams(
            max_tokens=max_tokens, temperature=temperature, seed=None if temperature == 0 else seed * 1_000_003 + i
        )
        for i in indices
    ]
    if "messages" in records[0]:
        outputs = engine.chat([r["messages"] for r in records], params, use_tqdm=False)
    else:
        outputs = engine.generate([r["prompt"] for r in records], params, use_tqdm=False)
    return [o.outputs[0].text for o in outputs]


def _answered(record: dict, index: int, answer: str) -> dict:
    if "messages" in record:
        return {**record, "messages": [*record["messages"], {"role": "assistant", "content": answer}], "index": index}
    return {**record, "completion": answer, "index": index}
