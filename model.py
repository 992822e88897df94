"""The U-Net eps_theta(x_t, t, y): a noisy image, its timestep and an optional class label in, an image out.

It is the network of DDPM (Ho et al. 2020, Appendix B), a Wide-ResNet / PixelCNN++ style U-Net:

    t ── sinusoid ── MLP ──(+ label embedding)── emb ──> every residual block
    x_t ── stem conv ── level 0 ── down ── level 1 ── down ── ... ── middle ── ... ── up ── level 0 ── out conv
                           └──────── skip connections: every encoder output feeds one decoder block ────────┘

For the `ddpm-cifar10` preset (35,746,307 parameters) the levels are, from the image down:

    level 0: 128 channels at 32x32    level 1: 256 at 16x16, with self-attention
    level 2: 256 channels at 8x8      level 3: 256 at 4x4    middle: 256 at 4x4, with self-attention

A text-conditional model (config text_encoder) also reads a caption: its text encoder (text.py) turns the token
ids into features, their mean is added to emb, and cross-attention after every self-attention (and in the middle)
lets each pixel look at the caption's tokens, as in latent diffusion (Rombach et al. 2022).

The network predicts something with the image's shape; what it means (eps, x0 or v) is up to diffusion.py.
pretrained.py reads the original DDPM CIFAR-10 weights in the diffusers format into this network, and writes them.
"""

import math

import torch
import torch.nn.functional as F
from torch import nn

import text


class GroupNorm(nn.GroupNorm):
    """GroupNorm with 32 groups and eps 1e-6, as in DDPM. A width that 32 does not divide (a layer of a pruned model:
    compress.py prune keeps widths a multiple of 8) gets the groups of `norm_groups` (groups_for).

    On a CPU, a bf16/fp16 channels-last input smaller than 32x32 is normalised in float32: PyTorch's kernel takes a
    slow path for those (it parallelises over batch x groups), several times slower than in float32. The result is
    rounded back to the input's dtype. (What it gains: README, Speed notes.)
    """

    def __init__(self, channels, norm_groups="divisor"):
        super().__init__(self.groups_for(channels, norm_groups), channels, eps=1e-6)

    @staticmethod
    def groups_for(channels, norm_groups="divisor"):
        """The groups of a GroupNorm of `channels`: 32 where 32 divides it; otherwise, for norm_groups "divisor",
        the most groups up to 32 that divide it, so that a layer pruned from 32 or 64 channels keeps its 1 or 2
        channels a group (24 -> 24 groups, 40 -> 20), and for "gcd", gcd(channels, 32) (24 -> 8, 40 -> 8), what
        pruned checkpoints of earlier versions have (config.Config.norm_groups)."""
        if norm_groups == "gcd":
            return math.gcd(channels, 32)
        return max(groups for groups in range(1, 33) if channels % groups == 0)

    def forward(self, x):
        if (x.device.type == "cpu" and x.dtype in (torch.bfloat16, torch.float16) and x.shape[-2] * x.shape[-1] < 1024
                and x.is_contiguous(memory_format=torch.channels_last)):
            return super().forward(x.float()).to(x.dtype)
        return super().forward(x)


class TimestepEmbedding(nn.Module):
    """Sinusoidal embedding of the timestep: the transformer's positional encoding, in DDPM's form.

    For i = 0 .. half-1, with half = dim / 2:
        emb(t)[i]        = sin(t * w_i)
        emb(t)[half + i] = cos(t * w_i),    w_i = 10000^(-i / (half - 1))
    so the frequencies run from 1 down to exactly 1/10000. Sines and cosines are two halves, not interleaved.
    """

    def __init__(self, dim):
        super().__init__()
        half = dim // 2
        # Computed as diffusers does (float32), so converted DDPM weights see exactly the same input.
        exponent = -math.log(10000) * torch.arange(half, dtype=torch.float32) / (half - 1)
        self.register_buffer("freqs", torch.exp(exponent), persistent=False)  # w_i, (half,)

    def forward(self, t):
        """t: (B,) timesteps (integers or floats). Returns (B, dim) float32."""
        angles = t.float()[:, None] * self.freqs[None, :]  # (B, half)
        return torch.cat([torch.sin(angles), torch.cos(angles)], dim=1)


def zero_init_(layer):
    """Set a layer's weight and bias to 0 and return it. DDPM zero-initialises the last layer of every residual
    branch (a block's second conv, attention's output projection) and the output conv: each branch then starts
    as nothing, so the fresh network is a chain of skip connections and learns the branches from there."""
    nn.init.zeros_(layer.weight)
    nn.init.zeros_(layer.bias)
    return layer


class ResBlock(nn.Module):
    """x + F(x, emb): GroupNorm, SiLU, 3x3 conv, add the projected embedding, GroupNorm, SiLU, dropout, 3x3 conv.

    When the channels change, a 1x1 conv on the skip path matches them. The second conv starts at zero, so a new
    block is its skip path alone.
    """

    def __init__(self, in_channels, out_channels, emb_dim, dropout):
        super().__init__()
        self.norm1 = GroupNorm(in_channels)
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, padding=1)
        self.emb_proj = nn.Linear(emb_dim, out_channels)
        self.norm2 = GroupNorm(out_channels)
        self.dropout = nn.Dropout(dropout)
        self.conv2 = zero_init_(nn.Conv2d(out_channels, out_channels, 3, padding=1))
        self.skip = nn.Conv2d(in_channels, out_channels, 1) if in_channels != out_channels else nn.Identity()

    def forward(self, x, emb):
        """x: (B, C_in, H, W); emb: (B, emb_dim), already through SiLU. Returns (B, C_out, H, W)."""
        h = self.conv1(F.silu(self.norm1(x)))
        h = h + self.emb_proj(emb)[:, :, None, None]  # one shift per channel, the same at every pixel
        h = self.conv2(self.dropout(F.silu(self.norm2(h))))
        return self.skip(x) + h


class SelfAttention(nn.Module):
    """x + proj(softmax(q k^T / sqrt(head_dim)) v): every pixel looks at every pixel, with `num_heads` heads.

    q, k and v are linear maps of GroupNorm(x), one token per pixel. The output projection starts at zero, so a new
    attention block passes x through unchanged.
    """

    def __init__(self, channels, num_heads):
        super().__init__()
        self.num_heads = num_heads
        self.norm = GroupNorm(channels)
        self.q = nn.Linear(channels, channels)
        self.k = nn.Linear(channels, channels)
        self.v = nn.Linear(channels, channels)
        self.proj = zero_init_(nn.Linear(channels, channels))

    def forward(self, x):
        """x: (B, C, H, W). Returns the same shape."""
        B, C, H, W = x.shape
        # A view in both memory formats, and already contiguous when x is channels_last.
        tokens = self.norm(x).flatten(2).transpose(1, 2)  # (B, HW, C)
        q = self.q(tokens).unflatten(2, (self.num_heads, -1)).transpose(1, 2)  # (B, heads, HW, head_dim)
        k = self.k(tokens).unflatten(2, (self.num_heads, -1)).transpose(1, 2)
        v = self.v(tokens).unflatten(2, (self.num_heads, -1)).transpose(1, 2)
        h = F.scaled_dot_product_attention(q, k, v)  # (B, heads, HW, head_dim)
        h = self.proj(h.transpose(1, 2).flatten(2))  # (B, HW, C)
        return x + h.transpose(1, 2).unflatten(2, (H, W))  # (B, C, H, W), a view with channels_last strides


def position_code(height, width, channels, device):
    """A fixed 2-D sinusoidal code of each pixel's position, (H W, channels): half the channels encode the row,
    half the column, each as sines and cosines of TimestepEmbedding's frequencies (as ViT-style 2-D codes do)."""
    quarter = channels // 4
    exponent = torch.arange(quarter, dtype=torch.float32, device=device) / max(quarter - 1, 1)
    freqs = torch.exp(-math.log(10000) * exponent)
    rows = torch.arange(height, dtype=torch.float32, device=device)[:, None] * freqs  # (H, quarter)
    columns = torch.arange(width, dtype=torch.float32, device=device)[:, None] * freqs  # (W, quarter)
    code = torch.cat([rows.sin()[:, None].expand(-1, width, -1), rows.cos()[:, None].expand(-1, width, -1),
                      columns.sin()[None].expand(height, -1, -1), columns.cos()[None].expand(height, -1, -1)], dim=2)
    return F.pad(code, (0, channels - 4 * quarter)).flatten(0, 1)  # (H W, channels)


class CrossAttention(nn.Module):
    """x + proj(softmax(q k^T / sqrt(head_dim)) v) with q from the pixels and k, v from the caption's tokens.

    q is a linear map of GroupNorm(x) plus a fixed code of the pixel's position (position_code), one query per
    pixel: the code lets words about where ("top", "left") find the pixels they mean, which GroupNorm'd features
    of a small image hardly say. k and v are linear maps of the text features (B, L, context_dim), and the mask
    (B, L) hides the padding, so the result does not depend on how much padding a caption has. The output
    projection starts at zero: a new block passes x through unchanged."""

    def __init__(self, channels, context_dim, num_heads):
        super().__init__()
        self.num_heads = num_heads
        self.norm = GroupNorm(channels)
        self.q = nn.Linear(channels, channels)
        self.k = nn.Linear(context_dim, channels)
        self.v = nn.Linear(context_dim, channels)
        self.proj = zero_init_(nn.Linear(channels, channels))

    def forward(self, x, context, mask):
        """x: (B, C, H, W); context: (B, L, context_dim); mask: (B, L) bool, True = a real token. Returns x's shape."""
        B, C, H, W = x.shape
        tokens = self.norm(x).flatten(2).transpose(1, 2)  # (B, HW, C)
        tokens = tokens + position_code(H, W, C, x.device).to(tokens.dtype)
        q = self.q(tokens).unflatten(2, (self.num_heads, -1)).transpose(1, 2)  # (B, heads, HW, head_dim)
        k = self.k(context).unflatten(2, (self.num_heads, -1)).transpose(1, 2)  # (B, heads, L, head_dim)
        v = self.v(context).unflatten(2, (self.num_heads, -1)).transpose(1, 2)
        h = F.scaled_dot_product_attention(q, k, v, attn_mask=mask[:, None, None, :])  # (B, heads, HW, head_dim)
        h = self.proj(h.transpose(1, 2).flatten(2))  # (B, HW, C)
        return x + h.transpose(1, 2).unflatten(2, (H, W))


class NoCrossAttention(nn.Module):
    """The place of a CrossAttention at a resolution without attention: x unchanged."""

    def forward(self, x, context, mask):
        return x


class Downsample(nn.Module):
    """Halve H and W: pad one zero row at the bottom and one column at the right, then a 3x3 conv with stride 2.

    This is TensorFlow's "SAME" padding, which DDPM used; nn.Conv2d can only pad both sides equally.
    """

    def __init__(self, channels):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, stride=2)

    def forward(self, x):
        return self.conv(F.pad(x, (0, 1, 0, 1)))  # (B, C, H+1, W+1) -> (B, C, H/2, W/2)


class Upsample(nn.Module):
    """Double H and W: repeat every pixel 2x2 (nearest neighbour), then a 3x3 conv."""

    def __init__(self, channels):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x):
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))  # (B, C, 2H, 2W)


class Level(nn.Module):
    """One resolution of the U-Net: residual blocks, each followed by attention (or nothing) and, in a
    text-conditional model, cross-attention (or nothing), then a resampler."""

    def __init__(self, blocks, attentions, resample, cross_attentions=()):
        super().__init__()
        self.blocks = nn.ModuleList(blocks)
        self.attentions = nn.ModuleList(attentions)  # SelfAttention or nn.Identity, one per block
        # CrossAttention or NoCrossAttention, one per block; empty (no weights) without a text encoder.
        self.cross_attentions = nn.ModuleList(cross_attentions)
        self.resample = resample  # Downsample, Upsample, or None at the bottom (encoder) / top (decoder)


class UNet(nn.Module):
    """The DDPM U-Net, optionally class-conditional (see the module docstring for the picture).

    Attributes: time_embed, time_mlp, label_embed (None when unconditional), stem, down (encoder levels,
    full resolution first), mid_block1, mid_attention, mid_block2, up (decoder levels, lowest resolution
    first), out_norm, out_conv. A conditional model has num_classes + 1 labels: label `num_classes` is the
    "null" label, used for classifier-free guidance and whenever y is not given. A text-conditional model (given a
    text_encoder, text.py) has text_encoder, text_proj and mid_cross_attention too, and takes token ids as y: the
    empty caption (a row of zeros) is its null condition.
    """

    def __init__(self, image_size, channels, num_classes, base_channels, channel_mults, num_res_blocks,
                 attn_resolutions, num_heads, dropout, text_encoder=None):
        super().__init__()
        self.num_classes = num_classes
        emb_dim = 4 * base_channels
        widths = [base_channels * mult for mult in channel_mults]

        def attention_at(level, width):
            """Self-attention when this level's feature maps have one of the configured sizes."""
            if image_size // 2 ** level in attn_resolutions:
                return SelfAttention(width, num_heads)
            return nn.Identity()

        def cross_attention_at(level, width):
            """Cross-attention where there is self-attention, in a text-conditional model; [] otherwise."""
            if text_encoder is None:
                return []
            if image_size // 2 ** level in attn_resolutions:
                return [CrossAttention(width, text_encoder.dim, num_heads)]
            return [NoCrossAttention()]

        self.time_embed = TimestepEmbedding(base_channels)
        self.time_mlp = nn.Sequential(nn.Linear(base_channels, emb_dim), nn.SiLU(), nn.Linear(emb_dim, emb_dim))
        self.label_embed = nn.Embedding(num_classes + 1, emb_dim) if num_classes > 0 else None
        self.text_encoder = text_encoder
        if text_encoder is not None:
            self.text_proj = nn.Linear(text_encoder.dim, emb_dim)  # the caption's mean feature, added to emb
        self.stem = nn.Conv2d(channels, base_channels, 3, padding=1)

        # Encoder. Every block's output, and every downsample's, is kept for the decoder: note their widths.
        skip_widths = [base_channels]
        width = base_channels
        self.down = nn.ModuleList()
        for level, out_width in enumerate(widths):
            blocks = []
            attentions = []
            cross_attentions = []
            for _ in range(num_res_blocks):
                blocks.append(ResBlock(width, out_width, emb_dim, dropout))
                attentions.append(attention_at(level, out_width))
                cross_attentions += cross_attention_at(level, out_width)
                width = out_width
                skip_widths.append(width)
            resample = None
            if level < len(widths) - 1:
                resample = Downsample(width)
                skip_widths.append(width)
            self.down.append(Level(blocks, attentions, resample, cross_attentions))

        self.mid_block1 = ResBlock(width, width, emb_dim, dropout)
        self.mid_attention = SelfAttention(width, num_heads)
        if text_encoder is not None:
            self.mid_cross_attention = CrossAttention(width, text_encoder.dim, num_heads)
        self.mid_block2 = ResBlock(width, width, emb_dim, dropout)

        # Decoder: one block more per level than the encoder, so that each takes exactly one skip.
        self.up = nn.ModuleList()
        for level, out_width in reversed(list(enumerate(widths))):
            blocks = []
            attentions = []
            cross_attentions = []
            for _ in range(num_res_blocks + 1):
                blocks.append(ResBlock(width + skip_widths.pop(), out_width, emb_dim, dropout))
                attentions.append(attention_at(level, out_width))
                cross_attentions += cross_attention_at(level, out_width)
                width = out_width
            resample = Upsample(width) if level > 0 else None
            self.up.append(Level(blocks, attentions, resample, cross_attentions))

        self.out_norm = GroupNorm(width)
        # Zero output at initialisation: the untrained model predicts 0, a calm start for any objective.
        self.out_conv = zero_init_(nn.Conv2d(width, channels, 3, padding=1))

    def forward(self, x, t, y=None):
        """x: (B, C, H, W) noisy images; t: (B,) timesteps in [0, T); y: (B,) labels, or None for the null label;
        for a text-conditional model, (B, L) token ids, or None for the empty caption.

        Returns (B, C, H, W).
        """
        emb = self.time_mlp(self.time_embed(t))  # (B, emb_dim)
        context = None
        if self.text_encoder is not None:
            if y is None:
                y = torch.zeros(x.shape[0], 1, dtype=torch.long, device=x.device)  # the empty caption
            elif y.ndim != 2:
                raise ValueError("this model is conditioned on captions, so y must be token ids (B, L)")
            context, mask = self.text_encoder(y)  # (B, L + 1, D), (B, L + 1)
            emb = emb + self.text_proj(text.masked_mean(context, mask))
        elif self.label_embed is not None:
            if y is None:
                y = torch.full((x.shape[0],), self.num_classes, dtype=torch.long, device=x.device)
            emb = emb + self.label_embed(y)
        elif y is not None:
            raise ValueError("this model is unconditional (num_classes = 0), so it takes no labels y")
        # DDPM applies SiLU to the embedding in every block before that block's projection; once here is the same.
        emb = F.silu(emb)

        h = self.stem(x)  # (B, base_channels, H, W)
        skips = [h]
        for level in self.down:
            for index, (block, attention) in enumerate(zip(level.blocks, level.attentions)):
                h = attention(block(h, emb))
                if context is not None:
                    h = level.cross_attentions[index](h, context, mask)
                skips.append(h)
            if level.resample is not None:
                h = level.resample(h)
                skips.append(h)

        h = self.mid_attention(self.mid_block1(h, emb))
        if context is not None:
            h = self.mid_cross_attention(h, context, mask)
        h = self.mid_block2(h, emb)

        for level in self.up:
            for index, (block, attention) in enumerate(zip(level.blocks, level.attentions)):
                h = torch.cat([h, skips.pop()], dim=1)  # (B, C + C_skip, H, W)
                h = attention(block(h, emb))
                if context is not None:
                    h = level.cross_attentions[index](h, context, mask)
            if level.resample is not None:
                h = level.resample(h)

        return self.out_conv(F.silu(self.out_norm(h)))


def fit_layers(model, weights):
    """Rebuild every convolution, linear layer, GroupNorm and embedding of `model` whose weight in the state dict
    `weights` has another shape, so that `weights` loads; returns the model.

    A pruned U-Net (compress.py prune) is the config's U-Net with fewer channels in some layers and the same
    connections: its checkpoint holds the layer shapes, and this rebuilds them, with no pruning library. A rebuilt
    GroupNorm gets the default groups of its width (create_model then applies the config's norm_groups); attention
    keeps its heads, each with fewer channels. The
    rebuilt layers are freshly initialised: load the weights next."""
    for name, layer in list(model.named_modules()):
        weight = getattr(layer, "weight", None)
        shape = getattr(weights.get(f"{name}.weight"), "shape", None)
        if weight is None or shape is None or shape == weight.shape:
            continue  # a layer without weights (load_state_dict names a stray one), no such weight, the same shape
        if isinstance(layer, nn.Conv2d):
            fitted = nn.Conv2d(shape[1] * layer.groups, shape[0], layer.kernel_size, layer.stride, layer.padding,
                               groups=layer.groups, bias=layer.bias is not None)
        elif isinstance(layer, nn.Linear):
            fitted = nn.Linear(shape[1], shape[0], bias=layer.bias is not None)
        elif isinstance(layer, GroupNorm):
            fitted = GroupNorm(shape[0])
        elif isinstance(layer, nn.Embedding):
            fitted = nn.Embedding(shape[0], shape[1])
        else:
            continue  # load_state_dict names what does not fit
        parent, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent), child, fitted)
    return model


def create_model(cfg, weights=None):
    """The U-Net described by the model fields of a Config; with `weights` (a state dict), in their layer shapes
    (fit_layers), for a pruned model's checkpoint; its GroupNorms grouped by cfg.norm_groups."""
    model = UNet(image_size=cfg.image_size, channels=cfg.channels, num_classes=cfg.num_classes,
                 base_channels=cfg.base_channels, channel_mults=cfg.channel_mults, num_res_blocks=cfg.num_res_blocks,
                 attn_resolutions=cfg.attn_resolutions, num_heads=cfg.num_heads, dropout=cfg.dropout,
                 text_encoder=text.create_text_encoder(cfg))
    if weights is not None:
        fit_layers(model, weights)
    for layer in model.modules():  # the config's rule for widths 32 does not divide (a pruned or a narrow model)
        if isinstance(layer, GroupNorm):
            layer.num_groups = GroupNorm.groups_for(layer.num_channels, cfg.norm_groups)
    return model
