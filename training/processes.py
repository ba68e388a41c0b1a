"""The processes a training run spans: accelerate's Accelerator, with FSDP on CPUs too.

On a machine without an accelerator, accelerate left alone runs the processes of a multi-process launch as
separate single-process jobs (each trains on the whole batch and writes the same output), and `accelerate launch
--cpu` starts only one process (without mpirun). Told cpu=True, it joins them over gloo: DDP. Its FSDP config it
turns into FSDP only on accelerators; torch's own FSDP2 runs on CPUs over gloo too, so there kdlora hands accelerate
the plugin the launcher described. The same config files (configs/ddp.yaml, configs/fsdp.yaml) and launch line
then work on GPUs and on CPUs, which is how both are tested without a GPU (tests/test_distill.py).
"""

import logging
import os

import torch

from hub.errors import KdloraError

# accelerate versions whose FSDP2 preparation was checked on CPU processes (tests/test_distill.py). Older ones are
# refused; newer ones run with a warning (a hard gate failed CI the day 1.16 came out, though 1.16 works).
FSDP_ON_CPU_ACCELERATE = ("1.15", "1.16")
log = logging.getLogger(__name__)


def make_accelerator():
    import accelerate
    from accelerate import Accelerator, PartialState
    from accelerate.utils import DistributedType, FullyShardedDataParallelPlugin

    # cpu: told it runs on CPUs, accelerate joins the processes over gloo. step_scheduler_with_optimizer=False:
    # kdlora's --batch-size is the global batch, divided over the processes, so the learning-rate schedule takes one
    # step per optimizer step (accelerate's default takes one per process, for per-process batches)
    accelerator = Accelerator(cpu=_cpu_processes(), step_scheduler_with_optimizer=False)
    if (
        os.environ.get("ACCELERATE_USE_FSDP", "false").lower() != "true"
        or accelerator.distributed_type != DistributedType.MULTI_CPU
    ):
        return accelerator
    _check_fsdp_on_cpu(accelerate.__version__)
    plugin = FullyShardedDataParallelPlugin()  # from the launcher's FSDP_* variables
    if plugin.fsdp_version != 2:
        raise KdloraError(
            "FSDP on CPU processes needs fsdp_version: 2 in the accelerate config (FSDP1 needs an accelerator)"
        )
    accelerator.state.fsdp_plugin = plugin
    # as accelerate does where it picks FSDP itself: both states say FSDP (AcceleratorState re-reads PartialState's)
    accelerator.state.distributed_type = PartialState().distributed_type = DistributedType.FSDP
    return accelerator


def _check_fsdp_on_cpu(version: str) -> None:
    from packaging.version import Version

    release = Version(version).release[:2]
    checked = [Version(v).release for v in FSDP_ON_CPU_ACCELERATE]
    if release < min(checked):
        raise KdloraError(
            f"FSDP on CPU processes needs accelerate >= {FSDP_ON_CPU_ACCELERATE[0]} (this is {version}); "
            "upgrade accelerate or launch without the FSDP config (DDP)"
        )
    if release > max(checked):
        log.warning(
            "FSDP on CPU processes was checked with accelerate %s; this is %s (unchecked, "
            "tests/test_distill.py checks it)",
            "/".join(FSDP_ON_CPU_ACCELERATE),
            version,
        )


def process_state():
    """accelerate's PartialState (which process this is, of how many, on which device), CPU processes over gloo."""
    from accelerate import PartialState

    return PartialState(cpu=_cpu_processes())


def _cpu_processes() -> bool:
    """Launched as several processes on a machine without an accelerator (accelerate then needs cpu=True)."""
    several = int(os.environ.get("WORLD_SIZE", "1")) > 1
    return several and not (torch.cuda.is_available() or (hasattr(torch, "xpu") and torch.xpu.is_available()))


def is_sharded(accelerator) -> bool:
    from accelerate.utils import DistributedType

    return accelerator.distributed_type == DistributedType.FSDP


# The trainable weights and the optimizer state, whole (not one process's shard), keyed by parameter name: one
# form for a single process, DDP and FSDP, so a checkpoint resumes under any of them.
_WHOLE = dict(full_state_dict=True, cpu_offload=True, ignore_frozen_params=True)


def gather_training_state(model, optimizer=None) -> tuple[dict, dict]:
    """(trainable weights, optimizer state or {}), on the main process (empty elsewhere). Every process calls it."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict, get_state_dict

    if optimizer is None:
        return get_model_state_dict(model, options=StateDictOptions(**_WHOLE)), {}
    return get_state_dict(model, optimizer, options=StateDictOptions(**_WHOLE))


def restore_training_state(model, optimizer, weights: dict, optimizer_state: dict) -> None:
    """Load what gather_training_state returned (given on the main process, sent from it to the others)."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict, set_optimizer_state_dict

    several = torch.distributed.is_initialized() and torch.distributed.get_world_size() > 1
    options = StateDictOptions(**_WHOLE, strict=False, broadcast_from_rank0=several)
    # apart, not set_state_dict: that one skips the model on a process given no weights (all but the main one)
    set_model_state_dict(model, weights, options=options)
    set_optimizer_state_dict(model, optimizer, optimizer_state, options=options)
