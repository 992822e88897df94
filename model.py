"""The U-Net eps_theta(x_t, t, y): a noisy image, its timestep and an optional class label in, an image out.

It is the network of DDPM (Ho et al. 2020, Appendix B), a Wide-ResNet / PixelCNN++ style U-Net:

    t ── sinusoid ── MLP ──(+ label embedding)── emb ──> every residual block
    x_t ── stem conv ── level 0 ── down ── level 1 ── down ── ... ── middle ── ... ── up ── level 0 ── out conv
                           └──────── skip connections: every encoder output feeds one decoder block ────────┘

For the `ddpm-cifar10` preset (35,746,307 parameters) the levels are, from the image down:

    level 0: 128 channels at 32x32    level 1: 256 at 16x16, with self-attention
    level 2: 256 channels at 8x8      level 3: 256 at 4x4    middle: 256 at 4x4, with self-attention

The network predicts something with the image's shape; what it means (eps, x0 or v) is up to diffusion.py.
`load_pretrained` reads the original DDPM CIFAR-10 weights in the diffusers format, `export_diffusers` writes them.
"""

import json
import math
import re
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from config import get_config


class GroupNorm(nn.GroupNorm):
    """GroupNorm with 32 groups and eps 1e-6, as in DDPM.

    On a CPU, a bf16/fp16 channels-last input smaller than 32x32 is normalised in float32: PyTorch's kernel takes a
    slow path for those (it parallelises over batch x groups), 4x slower than in float32. The result is rounded back
    to the input's dtype. (Sampling ddpm-cifar10 in bf16 on a 2-core CPU: 1.08x the images/s.)
    """

    def __init__(self, channels):
        super().__init__(32, channels, eps=1e-6)

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
    """One resolution of the U-Net: residual blocks, each followed by attention (or nothing), then a resampler."""

    def __init__(self, blocks, attentions, resample):
        super().__init__()
        self.blocks = nn.ModuleList(blocks)
        self.attentions = nn.ModuleList(attentions)  # SelfAttention or nn.Identity, one per block
        self.resample = resample  # Downsample, Upsample, or None at the bottom (encoder) / top (decoder)


class UNet(nn.Module):
    """The DDPM U-Net, optionally class-conditional (see the module docstring for the picture).

    Attributes: time_embed, time_mlp, label_embed (None when unconditional), stem, down (encoder levels,
    full resolution first), mid_block1, mid_attention, mid_block2, up (decoder levels, lowest resolution
    first), out_norm, out_conv. A conditional model has num_classes + 1 labels: label `num_classes` is the
    "null" label, used for classifier-free guidance and whenever y is not given.
    """

    def __init__(self, image_size, channels, num_classes, base_channels, channel_mults, num_res_blocks,
                 attn_resolutions, num_heads, dropout):
        super().__init__()
        self.num_classes = num_classes
        emb_dim = 4 * base_channels
        widths = [base_channels * mult for mult in channel_mults]

        def attention_at(level, width):
            """Self-attention when this level's feature maps have one of the configured sizes."""
            if image_size // 2 ** level in attn_resolutions:
                return SelfAttention(width, num_heads)
            return nn.Identity()

        self.time_embed = TimestepEmbedding(base_channels)
        self.time_mlp = nn.Sequential(nn.Linear(base_channels, emb_dim), nn.SiLU(), nn.Linear(emb_dim, emb_dim))
        self.label_embed = nn.Embedding(num_classes + 1, emb_dim) if num_classes > 0 else None
        self.stem = nn.Conv2d(channels, base_channels, 3, padding=1)

        # Encoder. Every block's output, and every downsample's, is kept for the decoder: note their widths.
        skip_widths = [base_channels]
        width = base_channels
        self.down = nn.ModuleList()
        for level, out_width in enumerate(widths):
            blocks = []
            attentions = []
            for _ in range(num_res_blocks):
                blocks.append(ResBlock(width, out_width, emb_dim, dropout))
                attentions.append(attention_at(level, out_width))
                width = out_width
                skip_widths.append(width)
            resample = None
            if level < len(widths) - 1:
                resample = Downsample(width)
                skip_widths.append(width)
            self.down.append(Level(blocks, attentions, resample))

        self.mid_block1 = ResBlock(width, width, emb_dim, dropout)
        self.mid_attention = SelfAttention(width, num_heads)
        self.mid_block2 = ResBlock(width, width, emb_dim, dropout)

        # Decoder: one block more per level than the encoder, so that each takes exactly one skip.
        self.up = nn.ModuleList()
        for level, out_width in reversed(list(enumerate(widths))):
            blocks = []
            attentions = []
            for _ in range(num_res_blocks + 1):
                blocks.append(ResBlock(width + skip_widths.pop(), out_width, emb_dim, dropout))
                attentions.append(attention_at(level, out_width))
                width = out_width
            resample = Upsample(width) if level > 0 else None
            self.up.append(Level(blocks, attentions, resample))

        self.out_norm = GroupNorm(width)
        # Zero output at initialisation: the untrained model predicts 0, a calm start for any objective.
        self.out_conv = zero_init_(nn.Conv2d(width, channels, 3, padding=1))

    def forward(self, x, t, y=None):
        """x: (B, C, H, W) noisy images; t: (B,) timesteps in [0, T); y: (B,) labels, or None for the null label.

        Returns (B, C, H, W).
        """
        emb = self.time_mlp(self.time_embed(t))  # (B, emb_dim)
        if self.label_embed is not None:
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
            for block, attention in zip(level.blocks, level.attentions):
                h = attention(block(h, emb))
                skips.append(h)
            if level.resample is not None:
                h = level.resample(h)
                skips.append(h)

        h = self.mid_block2(self.mid_attention(self.mid_block1(h, emb)), emb)

        for level in self.up:
            for block, attention in zip(level.blocks, level.attentions):
                h = torch.cat([h, skips.pop()], dim=1)  # (B, C + C_skip, H, W)
                h = attention(block(h, emb))
            if level.resample is not None:
                h = level.resample(h)

        return self.out_conv(F.silu(self.out_norm(h)))


def create_model(cfg):
    """The U-Net described by the model fields of a Config."""
    return UNet(image_size=cfg.image_size, channels=cfg.channels, num_classes=cfg.num_classes,
                base_channels=cfg.base_channels, channel_mults=cfg.channel_mults, num_res_blocks=cfg.num_res_blocks,
                attn_resolutions=cfg.attn_resolutions, num_heads=cfg.num_heads, dropout=cfg.dropout)


# --- The original DDPM CIFAR-10 weights, in the diffusers format ----------------------------------------------
# Only the `ddpm-cifar10` architecture is converted: it is the one the published weights have.

DDPM_CIFAR10_HUB_ID = "google/ddpm-cifar10-32"
DOWNLOAD_COMMAND = f"hf download {DDPM_CIFAR10_HUB_ID} --local-dir data/ddpm-cifar10-32"

# The diffusers UNet2DModel config of google/ddpm-cifar10-32 (our `ddpm-cifar10` preset), as export writes it.
DIFFUSERS_DDPM_CIFAR10_CONFIG = {
    "_class_name": "UNet2DModel",
    "sample_size": 32, "in_channels": 3, "out_channels": 3, "center_input_sample": False,
    "time_embedding_type": "positional", "time_embedding_dim": None, "freq_shift": 1, "flip_sin_to_cos": False,
    "down_block_types": ["DownBlock2D", "AttnDownBlock2D", "DownBlock2D", "DownBlock2D"],
    "mid_block_type": "UNetMidBlock2D",
    "up_block_types": ["UpBlock2D", "UpBlock2D", "AttnUpBlock2D", "UpBlock2D"],
    "block_out_channels": [128, 256, 256, 256], "layers_per_block": 2, "mid_block_scale_factor": 1,
    "downsample_padding": 0, "downsample_type": "conv", "upsample_type": "conv", "dropout": 0.0, "act_fn": "silu",
    "attention_head_dim": None, "norm_num_groups": 32, "attn_norm_num_groups": None, "norm_eps": 1e-06,
    "resnet_time_scale_shift": "default", "add_attention": True, "class_embed_type": None, "num_class_embeds": None,
    "num_train_timesteps": None,
}
# Keys whose diffusers default differs from DDPM's, so config.json must state them.
_KEYS_WITHOUT_DDPM_DEFAULT = ("block_out_channels", "down_block_types", "up_block_types", "freq_shift",
                              "flip_sin_to_cos", "downsample_padding", "attention_head_dim", "norm_eps")
# Keys that change neither the weights nor the output in eval mode.
_IGNORED_KEYS = ("sample_size", "dropout", "num_train_timesteps")

# Our module path (a regular expression) -> the diffusers module path; \1 and \2 are the level and block
# indices, which are the same in both. Encoder and decoder levels are ordered as in diffusers.
_MODULE_NAMES = [
    (r"stem", "conv_in"),
    (r"time_mlp\.0", "time_embedding.linear_1"),
    (r"time_mlp\.2", "time_embedding.linear_2"),
    (r"down\.(\d+)\.blocks\.(\d+)", r"down_blocks.\1.resnets.\2"),
    (r"down\.(\d+)\.attentions\.(\d+)", r"down_blocks.\1.attentions.\2"),
    (r"down\.(\d+)\.resample", r"down_blocks.\1.downsamplers.0"),
    (r"mid_block1", "mid_block.resnets.0"),
    (r"mid_attention", "mid_block.attentions.0"),
    (r"mid_block2", "mid_block.resnets.1"),
    (r"up\.(\d+)\.blocks\.(\d+)", r"up_blocks.\1.resnets.\2"),
    (r"up\.(\d+)\.attentions\.(\d+)", r"up_blocks.\1.attentions.\2"),
    (r"up\.(\d+)\.resample", r"up_blocks.\1.upsamplers.0"),
    (r"out_norm", "conv_norm_out"),
    (r"out_conv", "conv_out"),
]
# Layers inside those modules whose names differ (norm1, conv1, norm2, conv2 and conv are the same in both).
_LAYER_NAMES = {"emb_proj": "time_emb_proj", "skip": "conv_shortcut",  # ResBlock
                "norm": "group_norm", "q": "to_q", "k": "to_k", "v": "to_v", "proj": "to_out.0"}  # SelfAttention
# Files written by older diffusers versions, google/ddpm-cifar10-32 among them, use older attention names.
_OLD_ATTENTION_NAMES = {"query": "to_q", "key": "to_k", "value": "to_v", "proj_attn": "to_out.0"}


class PretrainedError(Exception):
    """A pretrained-weights folder that cannot be used; the message is one sentence meant for the user."""


def diffusers_name(name):
    """The diffusers UNet2DModel name of one of our parameter names, e.g. 'down.1.attentions.0.q.weight' ->
    'down_blocks.1.attentions.0.to_q.weight'."""
    for ours, theirs in _MODULE_NAMES:
        match = re.fullmatch(ours + r"(?:\.(?P<layer>\w+))?\.(?P<param>weight|bias)", name)
        if match:
            parts = [match.expand(theirs), _LAYER_NAMES.get(match["layer"], match["layer"]), match["param"]]
            return ".".join(part for part in parts if part)
    raise KeyError(f"{name} has no diffusers counterpart")


def _check_ddpm_architecture(model):
    """Raise PretrainedError unless `model` has exactly the weights of the ddpm-cifar10 U-Net."""
    with torch.device("meta"):  # shapes only, no memory and no initialisation cost
        reference = create_model(get_config("ddpm-cifar10"))
    shapes = {name: tuple(value.shape) for name, value in model.state_dict().items()}
    if shapes != {name: tuple(value.shape) for name, value in reference.state_dict().items()}:
        raise PretrainedError("only a U-Net with the ddpm-cifar10 architecture converts to the diffusers format, "
                              "and this model's weights have other names or shapes")


def _check_diffusers_config(config, folder):
    """Raise PretrainedError unless a diffusers config.json describes the DDPM CIFAR-10 U-Net."""
    for key, expected in DIFFUSERS_DDPM_CIFAR10_CONFIG.items():
        if key in _IGNORED_KEYS:
            continue
        if key not in config:
            if key in _KEYS_WITHOUT_DDPM_DEFAULT:
                raise PretrainedError(f"{folder}/config.json does not set {key}, and diffusers' default for it is "
                                      f"not DDPM's {expected!r}, so it is not the DDPM CIFAR-10 U-Net")
            continue
        if config[key] != expected:
            raise PretrainedError(f"{folder} holds a model with {key} = {config[key]!r}, but only the DDPM CIFAR-10 "
                                  f"U-Net ({DDPM_CIFAR10_HUB_ID}, {key} = {expected!r}) can be loaded")


def _find_folder(path):
    """A local folder as it is, anything else as a Hugging Face Hub id downloaded with snapshot_download."""
    folder = Path(path)
    if not folder.exists():
        try:
            from huggingface_hub import snapshot_download
        except ImportError:
            raise PretrainedError(f"{path} is not a folder, and downloading it needs huggingface_hub "
                                  f"(pip install huggingface_hub), or run `{DOWNLOAD_COMMAND}` on a machine with "
                                  f"network and pass that folder") from None
        try:
            files = ["config.json", "diffusion_pytorch_model.*"]  # the U-Net only, also from a pipeline's unet/
            folder = Path(snapshot_download(str(path), allow_patterns=files + [f"unet/{name}" for name in files]))
        except Exception as error:  # no network, unknown id, offline mode: all end the same way for the user
            raise PretrainedError(f"{path} is not a folder and could not be downloaded from the Hugging Face Hub "
                                  f"({type(error).__name__}); run `{DOWNLOAD_COMMAND}` on a machine with network "
                                  f"and pass that folder") from error
    if not (folder / "config.json").is_file() and (folder / "unet" / "config.json").is_file():
        folder = folder / "unet"  # a whole diffusers pipeline: the U-Net is in its unet/ subfolder
    return folder


def _read_weights(folder):
    """The tensors of diffusion_pytorch_model.safetensors (preferred) or .bin in `folder`, by diffusers name."""
    safetensors_file = folder / "diffusion_pytorch_model.safetensors"
    bin_file = folder / "diffusion_pytorch_model.bin"
    if safetensors_file.is_file():
        try:
            from safetensors.torch import load_file
        except ImportError:
            raise PretrainedError(f"reading {safetensors_file} needs safetensors: pip install safetensors") from None
        weights = load_file(safetensors_file, device="cpu")
    elif bin_file.is_file():
        weights = torch.load(bin_file, map_location="cpu", weights_only=True)
    else:
        raise PretrainedError(f"{folder} has neither diffusion_pytorch_model.safetensors nor "
                              f"diffusion_pytorch_model.bin, so it holds no diffusers weights")
    return {_current_attention_name(name): tensor for name, tensor in weights.items()}


def _current_attention_name(name):
    """'...attentions.0.query.weight' -> '...attentions.0.to_q.weight'; other names stay as they are."""
    for old, new in _OLD_ATTENTION_NAMES.items():
        name = re.sub(rf"\.{old}\.(weight|bias)$", rf".{new}.\1", name)
    return name


def load_pretrained(path):
    """The DDPM CIFAR-10 U-Net with pretrained weights, in eval mode (our `ddpm-cifar10` architecture).

    `path` is a diffusers UNet2DModel folder (config.json and diffusion_pytorch_model.safetensors or .bin),
    or a Hugging Face Hub id such as google/ddpm-cifar10-32, downloaded when huggingface_hub and a network are
    there. Only that architecture converts; anything else raises PretrainedError with one sentence.
    """
    folder = _find_folder(path)
    config_file = folder / "config.json"
    if not config_file.is_file():
        raise PretrainedError(f"{folder} has no config.json, so it is not a diffusers model folder")
    _check_diffusers_config(json.loads(config_file.read_text(encoding="utf-8")), folder)
    weights = _read_weights(folder)

    model = create_model(get_config("ddpm-cifar10"))
    ours = model.state_dict()
    names = {name: diffusers_name(name) for name in ours}
    for name, theirs in names.items():
        if theirs not in weights or weights[theirs].shape != ours[name].shape:
            raise PretrainedError(f"the weights in {folder} lack {theirs} of the DDPM U-Net or have another shape "
                                  f"for it, so they do not match their config.json")
    extra = sorted(set(weights) - set(names.values()))
    if extra:
        raise PretrainedError(f"the weights in {folder} have {len(extra)} tensor(s) the DDPM U-Net does not, "
                              f"such as {extra[0]}")
    model.load_state_dict({name: weights[theirs] for name, theirs in names.items()})
    return model.eval()


def export_diffusers(model, out_dir):
    """Write `model` (our ddpm-cifar10 U-Net, typically the EMA weights) as a diffusers UNet2DModel folder.

    The folder gets config.json and diffusion_pytorch_model.safetensors, which
    diffusers.UNet2DModel.from_pretrained(out_dir) loads. Returns the folder as a Path.
    """
    model = getattr(model, "_orig_mod", model)  # torch.compile wraps the module; its weights are the same
    _check_ddpm_architecture(model)
    try:
        from safetensors.torch import save_file
    except ImportError:
        raise PretrainedError("exporting to the diffusers format needs safetensors: pip install safetensors") from None
    folder = Path(out_dir)
    folder.mkdir(parents=True, exist_ok=True)
    # safetensors stores plain contiguous tensors; channels_last weights are made contiguous here.
    weights = {diffusers_name(name): tensor.detach().to("cpu", torch.float32).contiguous()
               for name, tensor in model.state_dict().items()}
    save_file(weights, folder / "diffusion_pytorch_model.safetensors", metadata={"format": "pt"})
    with open(folder / "config.json", "w", encoding="utf-8") as f:
        json.dump(DIFFUSERS_DDPM_CIFAR10_CONFIG, f, indent=2)
        f.write("\n")
    return folder
