"""Imported at start-up by every Python process of a `benchmarks/as_avx2_only.py` run (the wrapper puts this folder on
PYTHONPATH): torch's CPU checks answer as on an AVX2-only x86 CPU. kdlora decides from them (no native bf16: fp32
training, `--dtype float32` for vLLM), and so do vLLM's server processes (no AMX or AVX-512 attention kernels). A patch
in the wrapper's own process alone left `kdlora serve`'s vLLM in bf16 on its AMX attention kernel, most likely without
the AMX state oneDNN (held to AVX2) would have requested: its worker died of SIGILL."""

import torch.cpu

for check in (
    "_is_avx512_supported",
    "_is_avx512_vnni_supported",
    "_is_avx512_bf16_supported",
    "_is_amx_tile_supported",
    "_is_amx_fp16_supported",
):
    setattr(torch.cpu, check, lambda: False)
