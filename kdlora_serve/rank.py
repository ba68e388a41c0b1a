"""The rank protocol: every form a requested rank takes on its way from HTTP to the kernel, defined once.

1. HTTP `model`: `org/adapter@r8` (`split_model_name`, `model_name`). The middleware turns a budget into this name.
2. vLLM LoRA name: the same string names the LoRARequest (api.resolver); every rank of an adapter shares its LoRA id.
3. vLLM's per-token LoRA mapping (worker.lora_slots): id + want * RANK_STRIDE (`pack`, `unpack`), where
   want = 2 * rank + (1 with rsLoRA's alpha/sqrt(rank) scaling), and 0 = the slot's full rank (`want`).
4. Kernel inputs: each token's rank and its LoRA scale relative to its slot's (`token_ranks`, `scale_ratio`).

Imported by both processes: it needs torch only for step 4 and nothing from kdlora_serve.api.
"""

import re

from kdlora_serve.errors import RequestError

_NAME = re.compile(r"^(?P<adapter>.+?)@r(?P<rank>[^@]*)$")
_RANK = re.compile(r"[0-9]{1,9}")  # ASCII digits only: str.isdigit() and int() also take '²' and '٨'
MAX_MODEL_CHARS = 512  # far above any repo id or alias; longer names are refused before any lookup
RANK_STRIDE = 1 << 32  # vLLM's LoRA ids are a counter far below this


def model_name(adapter: str, rank: int) -> str:
    return f"{adapter}@r{rank}"


def split_model_name(model: str) -> tuple[str, int | None]:
    """`org/name@r8` -> ("org/name", 8); `org/name` -> ("org/name", None). A malformed rank is a RequestError (400)."""
    if len(model) > MAX_MODEL_CHARS:
        raise RequestError(
            f"model name '{model[:40]}...' is {len(model)} characters long; at most {MAX_MODEL_CHARS}", param="model"
        )
    match = _NAME.match(model)
    if not match:
        return model, None
    if not _RANK.fullmatch(match["rank"]):
        raise RequestError(
            f"'{model}': the rank after '@r' must be a whole number in ASCII digits, e.g. {match['adapter']}@r8",
            param="model",
        )
    return match["adapter"], int(match["rank"])


def kdlora_name(name: str) -> tuple[str | None, int | None]:
    """(adapter, rank) of a LoRA name kdlora gave, (None, None) for any other name (never raises)."""
    try:
        return split_model_name(name)
    except RequestError:
        return None, None


def is_rank_digits(text: str) -> bool:
    """Whether a header's text is a rank as the protocol spells one (ASCII digits)."""
    return bool(_RANK.fullmatch(text))


def want(rank: int | None, rslora: bool) -> int:
    """What a request asks of its adapter's slot: 0 = the slot's full rank, else 2 * rank + rsLoRA flag."""
    return 0 if rank is None else 2 * rank + bool(rslora)


def pack(lora_ids, wants):
    """vLLM mapping values: each LoRA id with its want folded in (ints or integer arrays)."""
    return lora_ids + wants * RANK_STRIDE


def unpack(values):
    """(LoRA ids, wants) from mapping values (integer tensors or arrays): undoes `pack`."""
    return values % RANK_STRIDE, values // RANK_STRIDE


def token_ranks(wants, slot_rank):
    """Each token's rank: its want's, or its slot's full rank R where want is 0; never above R (tensors)."""
    import torch

    return torch.where(wants == 0, slot_rank, wants // 2).clamp(max=slot_rank)


def scale_ratio(wants, slot_rank):
    """A rank's LoRA scale over its slot's (vLLM multiplied alpha/R into the slot's B): alpha/k over alpha/R, square
    roots with rsLoRA; 1 where want is 0. slot_rank: one R, or one per want (tensors)."""
    import torch

    rank = (wants // 2).clamp(min=1).double()
    ratio = torch.where(wants % 2 == 1, (slot_rank / rank).sqrt(), slot_rank / rank)
    return torch.where(wants == 0, 1.0, ratio).float()
