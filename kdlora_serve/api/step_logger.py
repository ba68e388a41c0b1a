"""The vLLM stat-logger plugin (entry point `vllm.stat_logger_plugins: kdlora`) that feeds `steps.STEPS`.

A module of its own because it subclasses a vLLM class: `kdlora serve`'s launcher and the CLI import `steps` (through
the store and the policy) and would otherwise pay vLLM's ~10 s import before vLLM's own process starts."""

from vllm.v1.metrics.loggers import StatLoggerBase

from kdlora_serve.api.steps import STEPS, observe_iteration


class StepLogger(StatLoggerBase):
    """vLLM stat-logger plugin (entry point `vllm.stat_logger_plugins: kdlora`): every iteration into `STEPS`."""

    def __init__(self, vllm_config, engine_index: int = 0):
        from kdlora_serve import vllm_patches

        lora_config = vllm_config.lora_config
        if lora_config is not None:
            rank_aware = vllm_patches.rank_aware(lora_config)
            path = vllm_patches.LORA_PATHS[vllm_patches.backend()] if rank_aware else "stock"
            STEPS.configure(path, lora_config.max_lora_rank)

    def record(self, scheduler_stats, iteration_stats, mm_cache_stats=None, engine_idx: int = 0):
        observe_iteration(STEPS, scheduler_stats, iteration_stats)

    def log_engine_initialized(self):
        pass
