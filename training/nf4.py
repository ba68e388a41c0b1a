"""bitsandbytes NF4 on every CPU (the backend-specific part of loading a 4-bit base; PEFT's `bnb.py` idea).

bitsandbytes 0.50 `Linear4bit.forward`, on a CPU with AVX512-BF16, in eval mode without grad, converts the
layer's weight once into a packed CPU format (`bitsandbytes.functional._convert_weight_packed_for_cpu`)
that needs out_features % 32 == 0 and in_features % blocksize == 0. A pruned student's widths need not
fit (SmolLM2 pruned to hidden 360: `RuntimeError: shape '[576, 5]' is invalid for input of size 3240`),
so such layers are kept on bitsandbytes' generic path, which runs any width. The choice is each layer's
`support_avx512bf16_for_cpu` flag (bitsandbytes sets it from the CPU at construction); tests force it.

On such CPUs bitsandbytes also logs, at import, that it could not fetch an optional kernel from the Hub
(the `kernels` package; offline it cannot work anyway). That note is not the user's concern: it is
dropped from bitsandbytes' logger, and nothing else is.
"""

import logging
import sys

PACKED_OUT_MULTIPLE = 32  # block_n of the packed format: output rows are packed 32 at a time
KERNELS_NOTE = "Failed to load CPU gemm_4bit_forward from kernels-community"
_BNB_CPU_LOGGER = "bitsandbytes.backends.cpu.ops"


def fits_packed_cpu_format(out_features: int, in_features: int, blocksize: int = 64) -> bool:
    """Whether bitsandbytes' packed AVX512-BF16 CPU format can hold an [out, in] NF4 weight."""
    return out_features % PACKED_OUT_MULTIPLE == 0 and in_features % blocksize == 0


def keep_unpackable_layers_generic(model) -> int:
    """Turn the packed CPU path off for 4-bit layers whose widths it cannot hold; returns how many.

    Layers that fit keep the fast packed path; on CPUs without AVX512-BF16 (flag already off) nothing changes."""
    import bitsandbytes as bnb

    packed = [m for m in model.modules() if isinstance(m, bnb.nn.Linear4bit) and getattr(m, "support_avx512bf16_for_cpu", False)]
    unfit = [m for m in packed if not fits_packed_cpu_format(m.out_features, m.in_features, _blocksize(m))]
    for layer in unfit:
        layer.support_avx512bf16_for_cpu = False
    if unfit:
        shapes = sorted({f"{m.in_features}->{m.out_features}" for m in unfit})
        print(f"NF4: {len(unfit)} of {len(packed)} 4-bit layers use bitsandbytes' generic CPU path: their widths ({', '.join(shapes[:4])}"
              f"{', ...' if len(shapes) > 4 else ''}) do not fit its packed AVX512-BF16 format (in_features % {_blocksize(unfit[0])}, "
              f"out_features % {PACKED_OUT_MULTIPLE})", file=sys.stderr, flush=True)
    return len(unfit)


def _blocksize(layer) -> int:
    state = getattr(layer.weight, "quant_state", None)
    return state.blocksize if state is not None else layer.weight.blocksize


def _not_kernels_note(record: logging.LogRecord) -> bool:
    return not str(record.msg).startswith(KERNELS_NOTE)


def quiet_kernels_note() -> None:
    """Drop bitsandbytes' optional-`kernels` note (idempotent; must run before bitsandbytes is imported)."""
    logger = logging.getLogger(_BNB_CPU_LOGGER)
    if _not_kernels_note not in logger.filters:
        logger.addFilter(_not_kernels_note)


def packed_cpu_path_available() -> bool:
    """Whether bitsandbytes takes its packed AVX512-BF16 path on this CPU (what `kdlora doctor` reports)."""
    quiet_kernels_note()
    from bitsandbytes.functional import has_avx512bf16

    return bool(has_avx512bf16())
