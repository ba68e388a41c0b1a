"""What runs in vLLM's engine (worker) processes: the rank carried in vLLM's LoRA mapping (lora_slots) and the rank-aware
LoRA compute on CPU (lora_cpu) and CUDA (lora_triton). Imports nothing from kdlora_serve.api."""
