"""Structured channel pruning of the U-Net: the same network with fewer channels, scored on the diffusion loss.

    pruned = prune_unet(model, diffusion, batches, ratio=0.3)   # in place; batches: (x0, y or None) pairs
    params, flops = size_of(pruned, cfg)                         # parameters, and FLOPs of one image's forward

Torch-Pruning (Fang et al. 2023, DepGraph) finds the groups of channels that must go together: a block's output
and the skip path it is added to, the channels a decoder block concatenates from the encoder, a GroupNorm's groups
and the attention heads (each head keeps the same channels; the number of heads stays). Every group loses `ratio` of
its channels, the kept width rounded to the nearest multiple of 8 (kept_width; for attention, of 8 and the number
of heads; 32 channels at ratio 0.3 keep 24), the least important ones, as Diff-Pruning (Fang et al. 2023) scores
them: the first-order Taylor estimate |w x dL/dw| of the loss change, with the gradients of the diffusion training
loss summed over `batches` (so over many timesteps). The layers that see the image (the stem's input, the output convolution) and the timestep's sinusoid
keep their channels, so the pruned model takes and returns what the original does.

A GroupNorm does not tie channels together: any of them can go, and the pruned layer has the most groups up to 32
that divide its width (model.GroupNorm.groups_for, norm_groups "divisor"), so the 32-channel layers of a small U-Net
(one channel per group) can shrink too and keep one channel a group: the channels that stay are normalised exactly
as before. A 64-channel layer (two a group) pruned to 40 keeps two a group, some with new partners, which the
fine-tuning repairs. (Grouping by gcd(width, 32) instead, as the first version did, put 24 channels in threes and 40
in fives: the pruned demo then needed many more steps to recover; README, Compression.)

The result is an ordinary UNet whose layers have fewer channels: its state dict is all a checkpoint needs, and
model.create_model(cfg, weights) rebuilds it without this library (model.fit_layers). Imports torch_pruning.
"""

import math

import torch

import utils
from model import GroupNorm, SelfAttention

ROUND_TO = 8  # every pruned width is a multiple of this, so every GroupNorm keeps at least 8 groups


def kept_width(width, ratio, multiple=ROUND_TO):
    """The channels a layer of `width` keeps when `ratio` of them go: (1 - ratio) x width rounded to the nearest
    multiple of `multiple`, at least one multiple, at most the width."""
    return min(width, max(multiple, round(width * (1 - ratio) / multiple) * multiple))


def _torch_pruning():
    """The library, imported when needed, or one sentence on how to install it."""
    try:
        import torch_pruning
    except ImportError as error:
        raise utils.UsageError("pruning needs Torch-Pruning: pip install torch-pruning (see requirements.txt)") \
            from error
    return torch_pruning


def _group_norm_pruner(torch_pruning):
    """Torch-Pruning's GroupNorm pruning, without its rule that every group keeps the same share of channels: a
    pruned GroupNorm gets the groups that model.GroupNorm gives its new width."""

    class FreeGroupNormPruner(torch_pruning.pruner.function.GroupNormPruner):
        def prune_out_channels(self, layer, idxs):
            layer = super().prune_out_channels(layer, idxs)
            layer.num_groups = GroupNorm.groups_for(layer.num_channels)
            return layer

        prune_in_channels = prune_out_channels

        def get_out_channel_groups(self, layer):
            return 1  # no grouping of the channels for the pruner to keep

        get_in_channel_groups = get_out_channel_groups

    return FreeGroupNormPruner()


def example_inputs(cfg, batch_size=1):
    """Inputs of one network call, (x_t, t) or (x_t, t, y), for tracing the model and counting its FLOPs."""
    generator = torch.Generator().manual_seed(0)  # not the global RNG, whose draws belong to the caller
    x = torch.randn(batch_size, cfg.channels, cfg.image_size, cfg.image_size, generator=generator)
    t = torch.full((batch_size,), cfg.timesteps // 2, dtype=torch.long)
    return (x, t, torch.zeros(batch_size, dtype=torch.long)) if cfg.num_classes else (x, t)


def size_of(model, cfg):
    """(parameters, FLOPs of one image's forward pass as utils.count_flops counts them)."""
    was_training = model.training
    flops = utils.count_flops(model.eval(), *example_inputs(cfg))
    model.train(was_training)
    return sum(p.numel() for p in model.parameters()), flops


def prune_unet(model, diffusion, batches, ratio, cfg, seed=0):
    """Remove `ratio` of the channels of every prunable group of the float32 UNet `model`, in place, the least
    important first (module docstring); `batches` are (x0, y or None) pairs whose diffusion loss
    (diffusion.training_loss, its timesteps and noise drawn from `seed`) scores them. Returns the model, in eval
    mode."""
    torch_pruning = _torch_pruning()
    heads = {}
    for layer in model.modules():
        if isinstance(layer, SelfAttention):
            heads.update({projection: layer.num_heads for projection in (layer.q, layer.k, layer.v)})
    # The library keeps int(width x (1 - ratio)) channels of each group (per head in attention) and rounds only
    # down, so each layer that can lead a group gets the ratio that keeps kept_width (+ 0.5 against float error).
    ratios = {}
    for layer in model.modules():
        width = getattr(layer, "out_channels", getattr(layer, "out_features", None))
        if width:
            kept = kept_width(width, ratio, math.lcm(ROUND_TO, heads.get(layer, 1)))
            ratios[layer] = 0.0 if kept >= width else 1 - (kept + 0.5) / width
    model.eval()  # tracing: no dropout
    pruner = torch_pruning.pruner.MetaPruner(model, example_inputs(cfg, 2),
                                             importance=torch_pruning.importance.TaylorImportance(),
                                             pruning_ratio=ratio, pruning_ratio_dict=ratios,
                                             ignored_layers=[model.out_conv], num_heads=heads,
                                             customized_pruners={GroupNorm: _group_norm_pruner(torch_pruning)})
    model.train()
    model.zero_grad()
    with torch.random.fork_rng(devices=[]):  # the same channels every time, and the caller's random draws untouched
        torch.manual_seed(seed)
        for x0, y in batches:
            diffusion.training_loss(model, x0, y).backward()  # the gradients add up over the batches
    pruner.step()
    model.zero_grad(set_to_none=True)
    return model.eval()
