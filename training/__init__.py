# Training imports bitsandbytes (through transformers and peft); its optional-`kernels` note is dropped
# before that can happen (training/nf4.py says why).
from training.nf4 import quiet_kernels_note

quiet_kernels_note()
