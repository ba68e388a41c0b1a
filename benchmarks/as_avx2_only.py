"""Run a `kdlora` command as an AVX2-only CPU would, on an AVX-512 one (issue 28: the quickstart's time on both CPU
kinds, with only the second kind at hand). In every process the command starts (the vLLM server's too), torch's CPU
checks answer as an AVX2-only CPU's (`avx2_only/sitecustomize.py`), so kdlora's decision and vLLM's follow (no native
bf16: fp32 training, fp32 vLLM), and PyTorch, oneDNN and MKL are held to their AVX2 kernels. bitsandbytes needs
nothing: a base kdlora trains is on its generic path on every CPU (training.nf4). An emulation, not the machine: the
clock, caches and memory are this host's.

    python benchmarks/as_avx2_only.py quickstart --out /tmp/qs
"""

import os
import sys
from pathlib import Path

# read when Python and torch start, so set before the command's first process; every process it starts inherits them
os.environ.update(
    ATEN_CPU_CAPABILITY="avx2",
    ONEDNN_MAX_CPU_ISA="AVX2",
    MKL_ENABLE_INSTRUCTIONS="AVX2",
    PYTHONPATH=os.pathsep.join(filter(None, [str(Path(__file__).parent / "avx2_only"), os.environ.get("PYTHONPATH")])),
)
os.execv(sys.executable, [sys.executable, "-m", "kdlora_serve.cli", *sys.argv[1:]])
