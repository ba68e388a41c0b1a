"""Nested-rank (DyLoRA / QDyLoRA) forward on top of PEFT's LoRA layers.

PEFT injects an ordinary rank-R LoRA (also onto bitsandbytes 4-bit layers); `NestedRank.set(b)` then
makes every LoRA layer compute `B[:, :b] @ A[:b] x * alpha / b` by masking the rank components >= b at
the output of `lora_A` and setting PEFT's per-layer scaling. Masked components get exactly zero
gradient, so a step at rank b trains only what rank b uses, and the adapter saved at rank R truncates
(hub.adapter) to exactly what training computed at rank b. `set(0)` switches the adapter off.
"""

import torch


class NestedRank:
    def __init__(self, peft_model, adapter: str = "default"):
        from peft.tuners.lora import LoraLayer

        self.adapter = adapter
        self.layers = [m for m in peft_model.modules() if isinstance(m, LoraLayer) and adapter in m.lora_A]
        if not self.layers:
            raise ValueError(f"no LoRA layers with adapter '{adapter}' in the model")
        self.max_rank = max(layer.r[adapter] for layer in self.layers)
        self.rank = self.max_rank
        self._hooks = [layer.lora_A[adapter].register_forward_hook(self._mask) for layer in self.layers]

    def _mask(self, module, args, output: torch.Tensor) -> torch.Tensor:
        if self.rank >= output.shape[-1]:
            return output
        keep = torch.arange(output.shape[-1], device=output.device) < self.rank
        return output * keep.to(output.dtype)

    def set(self, rank: int) -> None:
        """Make the whole model compute at nested rank `rank` (0 <= rank <= max_rank)."""
        if not 0 <= rank <= self.max_rank:
            raise ValueError(f"rank {rank} is outside 0..{self.max_rank}")
        self.rank = rank
        for layer in self.layers:
            effective = min(rank, layer.r[self.adapter])
            layer.scaling[self.adapter] = layer.lora_alpha[self.adapter] / max(effective, 1)  # DyLoRA: alpha / b

    def remove(self) -> None:
        self.set(self.max_rank)
        for hook in self._hooks:
            hook.remove()


RANK_SCHEDULES = ("uniform", "pow2", "sandwich")


def step_ranks(step: int, seed: int, max_rank: int, schedule: str = "uniform") -> list[int]:
    """The ranks trained at `step`, largest first; a pure function of (seed, step).

    uniform / pow2: one sampled rank (DyLoRA). sandwich (the slimmable networks' rule, Yu & Huang 2019): the
    largest and the smallest rank at every step plus one sampled between them, so the top of the ladder gets
    an update every step instead of 1/R of them (costs up to 3 forward/backward passes per step)."""
    if schedule == "sandwich":
        return sorted({max_rank, 1, sample_rank(step, seed, max_rank, "uniform")}, reverse=True)
    return [sample_rank(step, seed, max_rank, schedule)]


def sample_rank(step: int, seed: int, max_rank: int, distribution: str = "uniform") -> int:
    """The rank trained at `step`: a pure function of (seed, step), so resumed and multi-process runs agree."""
    generator = torch.Generator().manual_seed(seed * 1_000_003 + step)
    if distribution == "uniform":
        return int(torch.randint(1, max_rank + 1, (1,), generator=generator))
    if distribution == "pow2":  # 1, 2, 4, ... and R itself: the ranks usually served
        choices = sorted({2**i for i in range(max_rank.bit_length()) if 2**i <= max_rank} | {max_rank})
        return choices[int(torch.randint(len(choices), (1,), generator=generator))]
    raise ValueError(f"unknown rank distribution '{distribution}'; use uniform or pow2")
