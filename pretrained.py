"""The original DDPM CIFAR-10 weights, in the diffusers format: reading them into our U-Net, and writing ours out.

    model = load_pretrained("data/ddpm-cifar10-32")     # a diffusers UNet2DModel folder, or a Hub id
    export_diffusers(model, "out/my-ddpm")              # diffusers.UNet2DModel.from_pretrained("out/my-ddpm") reads it

Only the `ddpm-cifar10` architecture converts: it is the one the published weights have. The two networks' weights
map one to one by an explicit table of names (_MODULE_NAMES, _LAYER_NAMES); neither diffusers nor huggingface_hub
is needed to read a local folder. Imports config and model.
"""

import json
import re
from pathlib import Path

import torch

from config import UserError, get_config
from model import create_model

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


class PretrainedError(UserError):
    """A pretrained-weights folder that cannot be used."""


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
