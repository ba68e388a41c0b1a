"""`kdlora teacher cache`: the teacher's targets computed once, reused by every distillation run and rank schedule.

For every training row of a data SPEC (the rows `kdlora distill` trains on: same SPEC and --seq-len), at each token
the loss learns: the teacher's top-k log-probabilities at temperature T and their vocabulary ids; the rest of the
vocabulary is one more bucket (1 - the top-k mass). `kdlora distill --teacher-cache DIR` then trains with no
teacher in memory: the KL is taken over those k + 1 buckets (the student's tail bucket is 1 - its mass on the k
ids), which is the exact KL when k covers the vocabulary and never more than it otherwise (merging outcomes can
only lower a KL). Plain top-k renormalises the teacher onto its k ids instead, which biases it.
`--sampling rs-kd` (random-sampling KD, arXiv 2503.16870) keeps instead k ids drawn from the teacher's distribution
at T (with replacement, seeded per shard), each distinct id with its share of the draws: the KL to that empirical
distribution has, in expectation, the gradient of the KL to the whole teacher (unbiased, where top-k is not), at the
cost of sampling noise; at most k distinct ids per token (the unused columns carry weight 0).
The teacher is still loaded to evaluate, before and after training, so reported quality is measured as in online runs.

Bytes: 8 per id and token (fp32 log-prob + int32 id): 512 B per token at k = 64. Files: DIR/cache.json (settings,
the data fingerprint, the vocabulary size) and shards DIR/rows-NNNNN.safetensors (logp, ids, and offsets: each
row's first token), each written whole (temp file + rename). An interrupted run resumes after the last shard in
DIR.partial; DIR appears when every row is done.
"""

import json
import os
import sys
from pathlib import Path

import torch

from hub.atomic import refuse_other_settings
from hub.errors import KdloraError
from hub.schema import ModelRef

FORMAT = 1
ROWS_PER_SHARD = 256
SAMPLINGS = ("top-k", "rs-kd")


def build_cache(
    spec: str,
    out: Path,
    teacher: str | None = None,
    seq_len: int = 256,
    top_k: int = 64,
    temperature: float = 2.0,
    batch_size: int = 8,
    rows_per_shard: int = ROWS_PER_SHARD,
    sampling: str = "top-k",
    seed: int = 0,
) -> Path:
    from safetensors.torch import save_file
    from tqdm.auto import tqdm

    from training.data import load_token_data
    from training.losses import check_head_split
    from training.teacher import load_causal_lm

    if out.exists():
        raise KdloraError(f"{out} already exists; a cache is written once; delete it or choose another --out")
    if top_k < 1 or temperature <= 0 or batch_size < 1 or rows_per_shard < 1:
        raise KdloraError(
            f"--top-k and --batch-size must be at least 1 and --temperature above 0 (got {top_k}, {batch_size}, {temperature})"
        )
    if sampling not in SAMPLINGS:
        raise KdloraError(f"--sampling {sampling}: use {' or '.join(SAMPLINGS)}")
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    model, tokenizer, teacher_ref = load_causal_lm(teacher, device=device)
    model.requires_grad_(False).eval()
    vocab_size = model.get_output_embeddings().weight.shape[0]
    data = load_token_data(spec, tokenizer, seq_len)
    refuse_rewordings(data)
    check_head_split(model, data.train[:1, :8].to(device))
    settings = {
        "format": FORMAT,
        "data": spec,
        "seq_len": seq_len,
        "data_fingerprint": data.fingerprint,
        "teacher": teacher_ref.id,
        "teacher_revision": teacher_ref.revision,  # distill refuses the cache for the same repo at another commit
        "top_k": min(top_k, vocab_size),
        "temperature": temperature,
        "vocab_size": vocab_size,
        "rows": len(data.train),
        "rows_per_shard": rows_per_shard,
        "sampling": sampling,
        **({"seed": seed} if sampling == "rs-kd" else {}),
    }
    partial = Path(f"{out}.partial")
    done = _resume(partial, settings)
    shards = range(0, len(data.train), rows_per_shard)
    with tqdm(total=len(data.train), desc="teacher cache", unit="row") as bar:
        for number, first in enumerate(shards):
            rows = range(first, min(first + rows_per_shard, len(data.train)))
            if number < done:
                bar.update(len(rows))
                continue
            logp, ids, counts = [], [], []
            draws = torch.Generator(device).manual_seed(
                seed * 1_000_003 + number
            )  # per shard: a resumed cache is the same bytes
            for start in range(rows.start, rows.stop, batch_size):
                batch_logp, batch_ids, batch_counts = _targets(
                    model,
                    data.train[start : min(start + batch_size, rows.stop)],
                    data.train_mask[start : min(start + batch_size, rows.stop)],
                    settings["top_k"],
                    temperature,
                    device,
                    draws if sampling == "rs-kd" else None,
                )
                logp.append(batch_logp), ids.append(batch_ids), counts.append(batch_counts)
                bar.update(len(batch_counts))
            offsets = torch.cat([torch.zeros(1, dtype=torch.int64), torch.cat(counts).cumsum(0)])
            temporary = partial / f".rows-{number:05d}.tmp"
            save_file(
                {"logp": torch.cat(logp).contiguous(), "ids": torch.cat(ids).contiguous(), "offsets": offsets},
                temporary,
            )
            os.replace(temporary, partial / _shard_name(number))
    os.replace(partial, out)
    return out


def _targets(
    model,
    rows: torch.Tensor,
    masks: torch.Tensor,
    k: int,
    temperature: float,
    device,
    draws=None,
    chunk_tokens: int = 256,
):
    """(log-probs [tokens, k] fp32, ids [tokens, k] int32, learned tokens per row) of one batch of rows: the top k, or
    with a generator `draws` the RS-KD sample; made chunk by chunk of tokens so that the full-vocabulary logits of the
    batch never exist at once."""
    from training.data import trimmed
    from training.losses import TeacherLogits, final_hidden_states

    batch, mask = trimmed(rows, masks)
    learned = mask[:, 1:]
    with torch.no_grad(), final_hidden_states(model) as head:
        hidden = model(batch.to(device)).logits[:, :-1][learned.to(device)]
    teacher, values, ids = TeacherLogits(hidden, head), [], []  # the same log-probs online distillation uses
    for start in range(0, len(hidden), chunk_tokens):
        logp = teacher.log_probs(start, start + chunk_tokens, temperature)[0]
        top = logp.topk(k, dim=-1) if draws is None else sampled(logp, k, draws).topk(k, dim=-1)
        values.append(top.values.cpu()), ids.append(top.indices.to(torch.int32).cpu())
    return torch.cat(values), torch.cat(ids), learned.sum(1)


def sampled(logp: torch.Tensor, k: int, draws: torch.Generator) -> torch.Tensor:
    """RS-KD's target: k ids drawn with replacement from exp(logp) [tokens, vocab], as log-probs over the vocabulary
    (log of each id's share of the draws, -inf where it was not drawn)."""
    picks = torch.multinomial(logp.float().exp(), k, replacement=True, generator=draws)
    shares = torch.zeros_like(logp, dtype=torch.float32).scatter_add_(
        -1, picks, torch.full(picks.shape, 1 / k, device=logp.device)
    )
    return shares.log()


def _shard_name(number: int) -> str:
    return f"rows-{number:05d}.safetensors"


def _resume(partial: Path, settings: dict) -> int:
    """How many shards `partial` already holds (0 when starting); refuses a partial cache made with other settings."""
    settings_file = partial / "cache.json"
    if not partial.exists():
        partial.mkdir(parents=True)
        settings_file.write_text(json.dumps(settings, indent=1))
        return 0
    refuse_other_settings(partial, settings_file, settings, "a cache")
    done = 0
    while (partial / _shard_name(done)).exists():
        done += 1
    if done:
        print(f"resuming: {done} shard(s) of {settings['rows_per_shard']} rows already in {partial}", file=sys.stderr)
    return done


class TopKTargets:
    """Cached teacher targets for ChunkedKDLoss: k log-probs per token and their ids, plus the tail bucket when k is
    less than the vocabulary."""

    def __init__(self, logp: torch.Tensor, ids: torch.Tensor, vocab_size: int, sampled: bool = False):
        # a sample's shares sum to 1: no tail. Its unused columns (share 0, stored log-prob -inf) get the lowest
        # finite log-prob instead, so that they add exactly 0 to the KL (0 * finite) where -inf would give nan
        if sampled:
            logp = logp.clamp(min=torch.finfo(logp.dtype).min)
        self.logp, self.ids, self.tail = logp, ids.long(), ids.shape[-1] < vocab_size and not sampled

    def log_probs(self, start: int, end: int, temperature: float):
        """(teacher log-probs, buckets) of tokens start..end; `temperature` is the cache's (TeacherCache checked it)."""
        logp, ids = self.logp[start:end], self.ids[start:end]
        if not self.tail:
            return logp, lambda student_logp: student_logp.gather(-1, ids)
        return _with_tail(logp), lambda student_logp: _with_tail(student_logp.gather(-1, ids))


def _with_tail(logp: torch.Tensor) -> torch.Tensor:
    """logp [tokens, k] and one more column: the log of the mass outside those k entries, log(1 - sum p), computed as
    log(-expm1(logsumexp)) to keep precision when the k entries hold nearly all the mass (floored at 1e-12)."""
    covered = torch.logsumexp(logp, dim=-1, keepdim=True).clamp(max=-1e-12)
    return torch.cat([logp, torch.log(-torch.expm1(covered))], dim=-1)


def refuse_rewordings(data) -> None:
    """A cache holds the teacher's targets for each row in one wording: data that trains rows in several cannot use one."""
    if data.train_wordings is not None:
        raise KdloraError(
            f"--teacher-cache holds the teacher's targets for each row in one wording, and data {data.spec} trains each "
            f"row in {len(data.train_wordings)} wordings; drop --teacher-cache (the teacher then runs online)"
        )


class TeacherCache:
    """An open cache, checked against the run that reads it; `targets(rows)` gives those training rows' targets in order."""

    def __init__(self, path: Path, data, temperature: float, vocab_size: int):
        from safetensors import safe_open

        settings_file = path / "cache.json"
        if not settings_file.is_file():
            partial = Path(f"{path}.partial")
            hint = (
                f"; {partial} is an unfinished one: rerun kdlora teacher cache to complete it"
                if partial.exists()
                else ""
            )
            raise KdloraError(f"--teacher-cache {path} is not a teacher cache (no cache.json){hint}")
        self.settings = json.loads(settings_file.read_text())
        if self.settings.get("format") != FORMAT:
            raise KdloraError(
                f"--teacher-cache {path} has format {self.settings.get('format')}; this kdlora reads format {FORMAT}: rebuild it"
            )
        if self.settings["data_fingerprint"] != data.fingerprint:
            raise KdloraError(
                f"--teacher-cache {path} was made for other training rows (data {self.settings['data']}, --seq-len "
                f"{self.settings['seq_len']}); give distill the same --data and --seq-len, or rebuild the cache"
            )
        if self.settings["temperature"] != temperature:
            raise KdloraError(
                f"--teacher-cache {path} holds log-probs at temperature {self.settings['temperature']}, the run asks "
                f"--kd-temperature {temperature}; use {self.settings['temperature']} or rebuild the cache"
            )
        if self.settings["vocab_size"] != vocab_size:
            raise KdloraError(
                f"--teacher-cache {path} is over a vocabulary of {self.settings['vocab_size']}, the student has {vocab_size}"
            )
        self.shards = [
            safe_open(str(path / _shard_name(n)), framework="pt")
            for n in range(-(-self.settings["rows"] // self.settings["rows_per_shard"]))
        ]
        self.offsets = [shard.get_tensor("offsets") for shard in self.shards]

    @property
    def teacher(self) -> ModelRef:
        return ModelRef(id=self.settings["teacher"], revision=self.settings.get("teacher_revision"))

    def targets(self, rows: list[int], device=None) -> TopKTargets:
        logp, ids = [], []
        for row in rows:
            number, local = divmod(row, self.settings["rows_per_shard"])
            start, end = self.offsets[number][local].item(), self.offsets[number][local + 1].item()
            logp.append(self.shards[number].get_slice("logp")[start:end])
            ids.append(self.shards[number].get_slice("ids")[start:end])
        return TopKTargets(
            torch.cat(logp).to(device),
            torch.cat(ids).to(device),
            self.settings["vocab_size"],
            sampled=self.settings.get("sampling") == "rs-kd",
        )
