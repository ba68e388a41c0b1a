"""Minitron's activation-based importance, from forward passes only (arXiv 2407.14679, section 2.2).

One calibration pass over the teacher with hooks collects, per unit, the size of what it writes:
- attention head: the norm of the head's output (the input of `o_proj`, split into heads);
- MLP neuron: the magnitude of its activation (the input of `down_proj`);
- embedding channel: the magnitude of every RMSNorm's output in that channel, summed over the norms;
- layer: Block Importance, 1 - cos(layer input, layer output) (a layer that barely turns the residual
  stream is cheap to drop; Men et al., ShortGPT).
Aggregation, per unit: L2 norm over a sample's tokens, then the mean over samples. Launched as several processes,
each scores its share of the calibration blocks and `gathered` combines them (sample-weighted means).
"""

from dataclasses import dataclass

import torch
from tqdm.auto import tqdm


@dataclass
class Importance:
    heads: torch.Tensor  # [layers, query heads]
    neurons: torch.Tensor  # [layers, intermediate]
    channels: torch.Tensor  # [hidden]
    layers: torch.Tensor  # [layers]
    samples: int


@torch.no_grad()
def activation_importance(model, blocks: torch.Tensor, batch_size: int = 8) -> Importance:
    config = model.config
    layers = model.model.layers
    n_layers, n_heads = len(layers), config.num_attention_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // n_heads
    heads = torch.zeros(n_layers, n_heads)
    neurons = torch.zeros(n_layers, config.intermediate_size)
    channels = torch.zeros(config.hidden_size)
    block = torch.zeros(n_layers)

    def seq_l2(x: torch.Tensor) -> torch.Tensor:  # [batch, tokens, units] -> [units], summed over the batch
        return x.float().norm(dim=1).sum(dim=0).cpu()

    def head_hook(i):
        def hook(module, args):
            x = args[0]
            heads[i] += seq_l2(x.view(*x.shape[:2], n_heads, head_dim).norm(dim=-1))

        return hook

    def neuron_hook(i):
        def hook(module, args):
            neurons[i] += seq_l2(args[0].abs())

        return hook

    def channel_hook(module, args, output):
        channels.add_(seq_l2(output.abs()))

    def block_hook(i):
        def hook(module, args, kwargs, output):
            x_in = args[0] if args else kwargs["hidden_states"]
            x_out = output[0] if isinstance(output, tuple) else output
            cos = torch.nn.functional.cosine_similarity(x_in.float(), x_out.float(), dim=-1)
            block[i] += (1 - cos).mean(dim=1).sum().cpu()

        return hook

    handles = []
    for i, layer in enumerate(layers):
        handles.append(layer.self_attn.o_proj.register_forward_pre_hook(head_hook(i)))
        handles.append(layer.mlp.down_proj.register_forward_pre_hook(neuron_hook(i)))
        handles.append(layer.input_layernorm.register_forward_hook(channel_hook))
        handles.append(layer.post_attention_layernorm.register_forward_hook(channel_hook))
        handles.append(layer.register_forward_hook(block_hook(i), with_kwargs=True))
    handles.append(model.model.norm.register_forward_hook(channel_hook))
    device = next(model.parameters()).device
    try:
        for start in tqdm(range(0, len(blocks), batch_size), desc="importance (calibration)", unit="batch"):
            model.model(blocks[start : start + batch_size].to(device))  # the LM head adds nothing to any score
    finally:
        for handle in handles:
            handle.remove()
    n = len(blocks)
    return Importance(heads / n, neurons / n, channels / n, block / n, samples=n)


def gathered(importance: Importance) -> Importance:
    """The importance over every process's share of the calibration blocks (each process passes its own), the same
    on every process; with one process, `importance` itself."""
    import torch.distributed as dist

    if not dist.is_initialized() or dist.get_world_size() == 1:
        return importance
    parts = (importance.heads, importance.neurons, importance.channels, importance.layers)
    sums = torch.cat(
        [part.flatten().double() * importance.samples for part in parts]
        + [torch.tensor([importance.samples], dtype=torch.float64)]
    )
    dist.all_reduce(sums)
    samples = int(sums[-1])
    means = (sums[:-1] / samples).float().split([part.numel() for part in parts])
    return Importance(*(mean.view_as(part) for mean, part in zip(means, parts)), samples=samples)
