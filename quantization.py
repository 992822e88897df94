"""Quantized checkpoints: the weights in half precision, or the U-Net in int8 for CPU inference.

    state = half_checkpoint(state, torch.bfloat16)         # bf16 / fp16 weights: half the file, no calibration
    prepared = prepare_int8(model, cfg)                    # the U-Net as a graph with observers (torch.export)
    for x_t, t, y in calibration_inputs:                   #   the model's own inputs along a sampler's trajectory
        prepared(x_t, t.float(), *([y] if y is not None else []))
    entries = int8_entries(prepared)                       # int8 weights + their scales + the observers' ranges
    model = Int8UNet.from_entries(entries, cfg)            # what inference.load_model builds from such a file

Int8 is PyTorch 2's export quantization, as torchao carries it for current torch (PT2E): torch.export turns the
U-Net into a graph, X86InductorQuantizer marks its convolutions and linear layers for int8 (weights symmetric per
output channel, activations per tensor), observers record the ranges of the activations over the calibration
inputs, and convert_pt2e puts quantize / dequantize pairs around those layers. torch.compile (inductor, with
freezing) then fuses each pair with its layer into an int8 oneDNN kernel: real int8 arithmetic, not float
arithmetic on rounded numbers (which is what the graph computes before it is compiled).

The file keeps the int8 weights (one byte each), a float32 scale per output channel, and the observers' state; the
graph itself is rebuilt from the config when the file is loaded (the same export, prepare and convert), so the file
holds tensors and plain values only and loads with torch.load(weights_only=True). Activations change with the
timestep, so the calibration inputs are the x_t a sampler visits at every one of its timesteps (Q-Diffusion, Li et
al. 2023; PTQ4DM, Shang et al. 2023), which compress.py records.

Imports model and utils, and no script; torchao only when int8 is used.
"""

import torch
from torch import nn
from torch._inductor import config as inductor_config

from model import create_model
import utils

MODES = ("bf16", "fp16", "int8")
HALF_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}
OBSERVER_PREFIX = "activation_post_process_"  # how prepare_pt2e names the observers it inserts


def describe(compression):
    """A few words on a compressed checkpoint's `compression` entry, for messages."""
    if compression["mode"] == "int8":
        return (f"int8 (PT2E, X86 Inductor; calibrated on {compression['calibration_images']} images x "
                f"{compression['calibration_steps']} {compression['calibration_sampler']} steps)")
    return f"{compression['mode']} weights"


# --- bf16 / fp16 weights ---------------------------------------------------------------------------------

def half_weights(state_dict, dtype):
    """The state dict with every floating tensor in `dtype`; integer buffers stay as they are. Loading it into the
    float32 U-Net (load_state_dict copies with a cast) gives the weights rounded to `dtype`."""
    return {name: tensor.to(dtype) if tensor.is_floating_point() else tensor for name, tensor in state_dict.items()}


# --- int8 ------------------------------------------------------------------------------------------------

def _torchao(reduce_range=False):
    """torchao's PT2E pieces, or a UsageError saying how to install it; reduce_range: 7-bit activations."""
    try:
        from torchao.quantization.pt2e.quantize_pt2e import convert_pt2e, prepare_pt2e
        from torchao.quantization.pt2e.quantizer import x86_inductor_quantizer as x86
    except ImportError as error:
        raise utils.UsageError(f"int8 needs torchao ({error}); install it with `pip install -r requirements.txt`") \
            from error
    quantizer = x86.X86InductorQuantizer().set_global(
        x86.get_default_x86_inductor_quantization_config(reduce_range=reduce_range))
    return prepare_pt2e, convert_pt2e, quantizer


FLOAT_LAYERS = ("skips", "ends", "none")


def float_modules(model, which="skips"):
    """The names of the layers that stay in float32 in the int8 model.

    ends: the first and the last convolution (the image in, the prediction out). skips (the default): those and
    the decoder's convolutions that read a skip concatenated to the features, whose two halves have ranges too
    different for one int8 scale (Q-Diffusion, Sec. 3.3). none: every convolution and linear layer in int8.
    README, Compression, has what each costs on the demo's model; skips keeps a third of the parameters of
    ddpm-cifar10 in float32 (a 72 MiB file, against 36 MiB for ends)."""
    if which == "none":
        return []
    names = ["stem", "out_conv"]
    for name, _ in model.named_modules():
        if which == "skips" and name.startswith("up.") and name.endswith((".conv1", ".skip")):
            names.append(name)
    return names


def example_inputs(cfg, batch_size=2):
    """(x_t, t[, y]) to export the U-Net with: t as float32, the dtype Int8UNet always passes (the timestep
    embedding takes t as a float anyway), y (labels) only for a class-conditional model."""
    x = torch.zeros(batch_size, cfg.channels, cfg.image_size, cfg.image_size)
    t = torch.zeros(batch_size)
    if cfg.num_classes:
        return x, t, torch.zeros(batch_size, dtype=torch.long)
    return x, t


def prepare_int8(model, cfg, reduce_range=False, float_modules=()):
    """The float32 U-Net as an exported graph (any batch size) with int8 marks and observers on its convolutions
    and linear layers, except those under the module names `float_modules`: run it on calibration inputs, then
    int8_entries()."""
    prepare_pt2e, _, quantizer = _torchao(reduce_range)
    for name in float_modules:
        quantizer.set_module_name_qconfig(name, None)
    inputs = example_inputs(cfg)
    batch = torch.export.Dim("batch", min=1, max=1 << 16)
    with torch.no_grad():
        graph = torch.export.export(model.eval(), inputs, dynamic_shapes=tuple({0: batch} for _ in inputs)).module()
    return prepare_pt2e(graph, quantizer)


def weight_observers(prepared):
    """{parameter name: its observer module} for the weights prepare_int8 marked for int8."""
    observers = {}
    for node in prepared.graph.nodes:
        if node.op == "call_module" and node.target.startswith(OBSERVER_PREFIX):
            source = node.args[0]
            if source.op == "get_attr":  # a weight; activations come from computed nodes
                observers[source.target] = getattr(prepared, node.target)
    return observers


def int8_entries(prepared):
    """What a calibrated prepare_int8 graph stores: (state dict, scales, zero points). In the state dict every
    int8 weight is the int8 tensor q, the others are float32 as trained, and the observers keep the ranges they saw;
    the weight w is scale * (q - zero_point), one scale per output channel, as the quantizer chose them."""
    state = prepared.state_dict()
    scales = {}
    zero_points = {}
    for name, observer in weight_observers(prepared).items():
        scale, zero_point = observer.calculate_qparams()
        assert observer.ch_axis == 0, "weights are quantized per output channel"
        # q = clamp(round(w x (1 / scale)) + zero_point, -128, 127): the op convert_pt2e quantizes weights with,
        # whose rounding (of w times 1 / scale, not of w / scale) decides about one weight in a few hundred.
        state[name] = torch.ops.quantized_decomposed.quantize_per_channel(
            state[name], scale.float(), zero_point, 0, observer.quant_min, observer.quant_max, torch.int8)
        scales[name] = scale.float()
        zero_points[name] = zero_point.to(torch.int32)
    return state, scales, zero_points


def dequantize(state, scales, zero_points):
    """The state dict with each int8 weight back in float32: scale * (q - zero_point) per output channel. Quantizing
    it again with the same scales gives q back exactly."""
    state = dict(state)
    for name, scale in scales.items():
        shape = (-1,) + (1,) * (state[name].dim() - 1)
        state[name] = (state[name].float() - zero_points[name].reshape(shape)) * scale.reshape(shape)
    return state


def convert_int8(prepared):
    """The calibrated graph with quantize / dequantize pairs in place of its observers (convert_pt2e)."""
    _, convert_pt2e, _ = _torchao()
    return convert_pt2e(prepared)


class Int8UNet(nn.Module):
    """The U-Net with int8 convolutions and linear layers, for sampling on an x86 CPU: called like the U-Net,
    model(x_t, t) or model(x_t, t, y), and returns float32 (B, C, H, W). The first calls compile it (inductor, with
    freezing): about a minute for the demo's model on 2 cores, paid back after a few hundred network calls."""

    def __init__(self, graph, num_classes, compile=True, weight_shapes=None):
        super().__init__()
        self.graph = graph
        self.num_classes = num_classes
        self.weight_shapes = weight_shapes or {}  # name -> shape of the float U-Net's tensors (a pruned one's own)
        if compile:
            inductor_config.freezing = True  # weights become constants of the graph: int8 kernels with prepacking
            self.run = torch.compile(graph)
        else:  # quantize / dequantize in float arithmetic: the same rounding, slowly (for tests)
            self.run = graph

    @classmethod
    def from_entries(cls, state, compression, cfg, compile=True):
        """Rebuild the int8 model from what int8_entries stored (the checkpoint's weights and its `compression`
        entry): export and prepare the config's U-Net again as it was prepared, load the weights and the
        observers' ranges, and convert. Raises utils.CheckpointError when they do not fit."""
        scales = compression["weight_scales"]
        zero_points = compression["weight_zero_points"]
        state = dequantize(state, scales, zero_points)
        prepared = prepare_int8(create_model(cfg, state), cfg, compression["reduce_range"],
                                compression["float_modules"])
        try:
            prepared.load_state_dict(state)
            # The per-channel observers' own loading skips their eps (the smallest scale), which the quantizer
            # sets above torch's default: copy it, or channels of tiny weights would get other scales.
            for name, value in state.items():
                if name.endswith(".eps"):
                    prepared.get_submodule(name.removesuffix(".eps")).eps.copy_(value)
        except (RuntimeError, KeyError, AttributeError) as error:
            reason = str(error).strip().splitlines()[0]
            raise utils.CheckpointError(f"the int8 weights do not fit the graph this torch builds from the config "
                                        f"(made with another version? quantize the float run again): "
                                        f"{reason[:200]}") from error
        shapes = {name: tensor.shape for name, tensor in state.items()}
        return cls(convert_int8(prepared), cfg.num_classes, compile, shapes)

    def train(self, mode=True):
        """An exported graph has no train mode (torch.export fixed it at eval): this only sets the flag, so
        that model.eval() works as on every model."""
        self.training = mode
        return self

    def forward(self, x, t, y=None):
        """x: (B, C, H, W); t: (B,) timesteps; y: (B,) labels or None (the null label). Float32 in and out:
        autocast does not reach the int8 graph."""
        inputs = [x.float().contiguous(), t.float()]
        if self.num_classes:
            inputs.append(y if y is not None else torch.full((x.shape[0],), self.num_classes, dtype=torch.long))
        elif y is not None:
            raise ValueError("this model is unconditional (num_classes = 0), so it takes no labels y")
        with torch.autocast("cpu", enabled=False):
            return self.run(*inputs)


def load_quantized(state, cfg, compression, compile=True):
    """The model of a compressed checkpoint's weights `state` (the entry under 'ema' or 'model'), in eval mode:
    the float32 U-Net for bf16 / fp16 weights, an Int8UNet for int8."""
    if compression["mode"] == "int8":
        return Int8UNet.from_entries(state, compression, cfg, compile)
    model = create_model(cfg, state)  # in the weights' layer shapes (a pruned model's)
    model.load_state_dict(state)  # the copy casts to float32
    return model.eval()


def check_options(mode, float_layers):
    """Raise utils.UsageError for an unknown --mode or --float-layers."""
    if mode not in MODES:
        raise utils.UsageError(f"--mode must be one of {', '.join(MODES)}, got {mode!r}")
    if float_layers not in FLOAT_LAYERS:
        raise utils.UsageError(f"--float-layers must be one of {', '.join(FLOAT_LAYERS)}, got {float_layers!r}")

