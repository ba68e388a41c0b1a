"""`kdlora quickstart`: the main job on the embedded default, end to end.

Today: export the embedded teacher and answer a few chat prompts with it through vLLM. Later stages
(prune, distill, push, serve) join here as they land.
"""

import os
import sys
import time

from training.teacher import embedded_teacher

PROMPTS = [
    "What is the capital of France?",
    "Write a Python function that returns the square of a number.",
    "Give one tip for writing clear documentation.",
]


def run_quickstart(max_tokens: int = 32) -> int:
    print("[1/2] embedded teacher: exporting SmolLM2-135M-Instruct (cached after the first run)", file=sys.stderr)
    teacher = embedded_teacher()
    print(f"      {teacher}", file=sys.stderr)

    print("[2/2] generating with vLLM (greedy)", file=sys.stderr)
    from kdlora_serve.engine import engine_defaults

    os.environ.setdefault("VLLM_LOGGING_LEVEL", "WARNING")  # our progress lines, not its start-up log
    engine = engine_defaults()
    for key, value in engine.env.items():
        os.environ.setdefault(key, value)
    from vllm import LLM, SamplingParams

    llm = LLM(model=str(teacher), **engine.llm_kwargs)
    start = time.perf_counter()
    outputs = llm.chat(
        [[{"role": "user", "content": prompt}] for prompt in PROMPTS],
        SamplingParams(temperature=0.0, max_tokens=max_tokens),
        use_tqdm=False,
    )
    seconds = time.perf_counter() - start
    tokens = sum(len(out.outputs[0].token_ids) for out in outputs)
    for prompt, out in zip(PROMPTS, outputs):
        print(f"\n> {prompt}\n{out.outputs[0].text.strip()}")
    print(f"\n{tokens} tokens in {seconds:.1f} s ({tokens / seconds:.1f} tok/s, batch of {len(PROMPTS)})")
    return 0
