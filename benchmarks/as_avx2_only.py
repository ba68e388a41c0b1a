"""Run a `kdlora` command as an AVX2-only CPU would, on an AVX512-BF16 one (issue 28: the quickstart's time on both
CPU kinds, with only the second kind at hand). kdlora's own decision is forced (no native bf16: fp32 training, fp32
vLLM), and PyTorch, oneDNN and MKL are held to their AVX2 kernels. bitsandbytes needs nothing: a base kdlora trains
is on its generic path on every CPU (training.nf4). An emulation, not the machine: the clock, caches and memory are
this host's.

    python benchmarks/as_avx2_only.py quickstart --out /tmp/qs
"""

import os
import sys

# read when torch loads its libraries, so before anything imports it; the vLLM server inherits them
os.environ.update(ATEN_CPU_CAPABILITY="avx2", ONEDNN_MAX_CPU_ISA="AVX2", MKL_ENABLE_INSTRUCTIONS="AVX2")

import kdlora_serve.engine as engine  # noqa: E402

engine.native_bf16 = lambda: False  # what kdlora_serve.engine.native_bf16 finds on an AVX2-only x86 CPU
from kdlora_serve.cli import main  # noqa: E402

sys.argv[0] = "kdlora"
sys.exit(main())
