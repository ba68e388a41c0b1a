"""kdlora's CUDA LoRA kernels on a real GPU (skipped without one): the engine-start self-check (kdlora_serve/worker/
kernel_check.py: kdlora's Triton kernels against vLLM's stock kernels, captured in a CUDA graph and replayed after
the tables change) on every layer shape of the embedded model with an lm_head LoRA too, at R = 64, in bf16 and fp16.
On CPU the same check runs under Triton's interpreter (tests/triton_interp). benchmarks/gpu_check.sh runs this file."""

import pytest
import torch

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (benchmarks/gpu_check.sh)")


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_kdlora_kernels_equal_vllms_on_the_gpu(dtype):
    from transformers import AutoConfig

    from kdlora_serve.worker import kernel_check
    from training.teacher import embedded_teacher

    shapes = kernel_check.decoder_shapes(AutoConfig.from_pretrained(embedded_teacher()), lm_head=True)
    assert kernel_check.run(shapes, 64, dtype, "cuda", graphs=True) is None
