"""bitsandbytes NF4 on every CPU (the backend-specific part of loading a 4-bit base; PEFT's `bnb.py` idea).

bitsandbytes 0.50 `Linear4bit.forward`, on a CPU with AVX512-BF16, in eval mode without grad, converts the
layer's weight in place into a packed CPU format (`bitsandbytes.functional._convert_weight_packed_for_cpu`)
and from then on computes the layer with `gemv_4bit`, which has no backward. A base that is evaluated and
then trained (distill measures the student alone before step 1) would train with every gradient that
should flow through a frozen 4-bit layer to its input silently dropped: the LoRA weights of all but the
last layers get wrong updates. The format also needs out_features % 32 and in_features % blocksize, which
a pruned student's widths need not meet (SmolLM2 pruned to hidden 360: `RuntimeError: shape '[576, 5]' is
invalid for input of size 3240`). So a base kdlora trains stays on bitsandbytes' generic path, which
runs any width, forward and backward. The choice is each layer's `support_avx512bf16_for_cpu` flag
(bitsandbytes sets it from the CPU at construction); tests force it.

On such CPUs bitsandbytes also logs, at import, that it could not fetch an optional kernel from the Hub
(the `kernels` package; offline it cannot work anyway). That note is not the user's concern: it is
dropped from bitsandbytes' logger, and nothing else is.
"""

import logging
import sys

KERNELS_NOTE = "Failed to load CPU gemm_4bit_forward from kernels-community"
_BNB_CPU_LOGGER = "bitsandbytes.backends.cpu.ops"


def keep_trainable(model) -> int:
    """Keep every 4-bit layer of a base that will be trained off the packed CPU path; returns how many were on it.

    On CPUs without AVX512-BF16 (flag already off) and on GPUs nothing changes."""
    import bitsandbytes as bnb

    packed = [
        m
        for m in model.modules()
        if isinstance(m, bnb.nn.Linear4bit) and getattr(m, "support_avx512bf16_for_cpu", False)
    ]
    for layer in packed:
        layer.support_avx512bf16_for_cpu = False
    if packed:
        print(
            f"NF4: {len(packed)} 4-bit layers use bitsandbytes' generic CPU path: its packed AVX512-BF16 path "
            "has no backward, so gradients would stop at the frozen base",
            file=sys.stderr,
            flush=True,
        )
    return len(packed)


def quantization_config(kind: str, compute_dtype):
    """transformers' BitsAndBytesConfig for a frozen model: `nf4` (4-bit NF4, computing in `compute_dtype`), `int8`
    (LLM.int8), or None for `none`."""
    from transformers import BitsAndBytesConfig

    if kind == "none":
        return None
    quiet_kernels_note()
    if kind == "nf4":
        return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=compute_dtype)
    if kind == "int8":
        return BitsAndBytesConfig(load_in_8bit=True)
    raise ValueError(f"quantization {kind!r}: use nf4, int8 or none")


def _not_kernels_note(record: logging.LogRecord) -> bool:
    return not str(record.msg).startswith(KERNELS_NOTE)


def quiet_kernels_note() -> None:
    """Drop bitsandbytes' optional-`kernels` note (idempotent; must run before bitsandbytes is imported)."""
    logger = logging.getLogger(_BNB_CPU_LOGGER)
    if _not_kernels_note not in logger.filters:
        logger.addFilter(_not_kernels_note)


def packed_cpu_path_available() -> bool:
    """Whether bitsandbytes would take its packed AVX512-BF16 path on this CPU (what `kdlora doctor` reports)."""
    quiet_kernels_note()
    from bitsandbytes.functional import has_avx512bf16

    return bool(has_avx512bf16())
