"""quantization.py and compress.py quantize: half-precision weights, the int8 U-Net (PT2E, X86 Inductor), their
checkpoints, and the calibration data.

Each test works in its own temporary folder with a tiny hand-made checkpoint (16x16, T = 20).
"""

from pathlib import Path

import pytest
import torch
from torch._inductor.utils import run_and_get_code

import benchmark
import compress
import inference
import quantization
import training
import utils
from conftest import tiny_checkpoint
from diffusion import create_diffusion

SAMPLING = ["--steps", "5", "--calibration-images", "4", "--batch-size", "4", "--compare-images", "0"]


@pytest.fixture(autouse=True)
def run(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    return tiny_checkpoint("tiny", 0, seed=0)


def quantize(*flags):
    """compress.py quantize on the tiny run; returns the checkpoint it wrote, read with weights_only."""
    path = compress.run(*compress.parse_options(["quantize", "--run-name", "tiny", *SAMPLING, *flags]))
    return path, utils.load_checkpoint(path)


def outputs(model, cfg, seed=1, batch=6):
    """The model's prediction on random x_t at random timesteps."""
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, cfg.channels, cfg.image_size, cfg.image_size, generator=generator)
    t = torch.randint(0, cfg.timesteps, (batch,), generator=generator)
    with torch.no_grad():
        return model(x, t)


@pytest.mark.parametrize("mode,dtype", [("bf16", torch.bfloat16), ("fp16", torch.float16)])
def test_half_weights_are_the_weights_rounded_and_load_as_a_run(mode, dtype):
    path, state = quantize("--mode", mode)
    assert path == Path("checkpoints/tiny-" + mode + "/last.pt")
    original = inference.load_model("tiny")
    for name, tensor in original.model.state_dict().items():
        assert state["ema"][name].dtype == (dtype if tensor.is_floating_point() else tensor.dtype)
    loaded = inference.load_model("tiny-" + mode)
    assert loaded.compression["mode"] == mode and f"{mode} weights" in loaded.source
    for name, tensor in original.model.state_dict().items():  # the float32 model holds the rounded weights
        torch.testing.assert_close(loaded.model.state_dict()[name], tensor.to(dtype).float(), rtol=0, atol=0)
    assert path.stat().st_size < 0.6 * Path("checkpoints/tiny/last.pt").stat().st_size / 2  # the file held 2 models


def test_int8_checkpoint_stores_int8_weights_within_half_a_step_of_the_float_ones():
    _, state = quantize()
    compression = state["compression"]
    original = inference.load_model("tiny").model.state_dict()
    scales = compression["weight_scales"]
    layers = [name for name, tensor in original.items() if name.endswith("weight") and tensor.dim() in (2, 4)]
    kept = [name for name in layers if name.removesuffix(".weight") in compression["float_modules"]]
    assert "stem.weight" in kept and "out_conv.weight" in kept and "up.0.blocks.0.conv1.weight" in kept
    assert all(state["ema"][name].dtype == torch.float32 for name in kept)
    conv_and_linear = [name for name in layers if name not in kept]
    assert sorted(scales) == sorted(conv_and_linear)  # every other convolution and linear layer, and nothing else
    dequantized_state = quantization.dequantize(state["ema"], scales, compression["weight_zero_points"])
    for name in conv_and_linear:
        q = state["ema"][name]
        assert q.dtype == torch.int8 and q.shape == original[name].shape
        assert torch.all(compression["weight_zero_points"][name] == 0)  # symmetric, as the X86 quantizer does it
        dequantized = dequantized_state[name]
        step = scales[name].reshape(-1, *[1] * (q.dim() - 1))
        assert torch.all((dequantized - original[name]).abs() <= step / 2 + 1e-7)


@pytest.mark.parametrize("vnni", [True, False])
def test_activations_keep_to_7_bits_on_cpus_without_an_int8_dot_product(monkeypatch, vnni):
    monkeypatch.setattr(utils, "cpu_has_int8_dot", lambda: vnni)
    _, state = quantize()
    assert state["compression"]["reduce_range"] is not vnni
    cfg = inference.load_model("tiny").cfg
    model = quantization.load_quantized(state["ema"], cfg, state["compression"], compile=False)
    code = model.graph.code  # activations are quantized to uint8 in [0, 127] or [0, 255]
    assert "quantize_per_tensor" in code
    assert (", 0, 127, torch.uint8)" in code) is not vnni and (", 0, 255, torch.uint8)" in code) is vnni


def test_calibration_covers_every_timestep_the_sampler_visits():
    _, state = quantize("--timestep-spacing", "karras")
    diffusion = create_diffusion(inference.load_model("tiny").cfg)
    visited = diffusion.sampling_timesteps(5, skip_type="karras")
    assert state["compression"]["calibration_timesteps"] == sorted(int(t) for t in visited)
    cfg = inference.load_model("tiny").cfg
    opts = compress.CompressOptions(steps=5, calibration_images=3, batch_size=2, timestep_spacing="karras")
    inputs = compress.calibration_inputs(inference.load_model("tiny").model, diffusion, cfg, opts)
    assert len(inputs) == 2 * 5  # two batches (2 + 1 images), one call per step
    assert [inputs[i][1][0].item() for i in range(5)] == [int(t) for t in visited]


def test_int8_model_rebuilt_from_the_file_is_the_calibrated_one_and_close_to_float():
    _, state = quantize()
    loaded = inference.load_model("tiny")
    cfg = loaded.cfg
    # What compress.py converted in memory, from the same calibration inputs.
    opts = compress.CompressOptions(steps=5, calibration_images=4, batch_size=4)
    inputs = compress.calibration_inputs(loaded.model, create_diffusion(cfg), cfg, opts)
    compression = state["compression"]
    prepared = quantization.prepare_int8(loaded.model, cfg, compression["reduce_range"], compression["float_modules"])
    with torch.no_grad():
        for x, t, _ in inputs:
            prepared(x, t.float())
    direct = quantization.Int8UNet(quantization.convert_int8(prepared), cfg.num_classes, compile=False)
    rebuilt = quantization.load_quantized(state["ema"], cfg, state["compression"], compile=False)
    reference = outputs(loaded.model, cfg)
    torch.testing.assert_close(outputs(rebuilt, cfg), outputs(direct, cfg), rtol=0, atol=0)
    error = (outputs(rebuilt, cfg) - reference).abs().mean() / reference.abs().mean()
    assert 0 < error < 0.1  # 6% for this random tiny model, on inputs it was not calibrated on


def test_compiled_int8_model_runs_int8_kernels_and_adds_no_error_to_the_reference_rounding():
    # One level without attention: the same layers to quantize, and a third of the compile time.
    tiny_checkpoint("one-level", 0, seed=0, channel_mults=(1,), attn_resolutions=())
    path = compress.run(*compress.parse_options(["quantize", "--run-name", "one-level", *SAMPLING]))
    state = utils.load_checkpoint(path)
    loaded = inference.load_model("one-level")
    compiled = inference.load_model("one-level-int8").model
    assert isinstance(compiled, quantization.Int8UNet)
    reference = quantization.load_quantized(state["ema"], loaded.cfg, state["compression"], compile=False)
    fast, code = run_and_get_code(outputs, compiled, loaded.cfg)  # the first call compiles
    exact = outputs(loaded.model, loaded.cfg)
    # The int8 kernels compute what the graph of quantize / dequantize pairs says, up to float rounding.
    assert (fast - exact).abs().mean() < 1.5 * (outputs(reference, loaded.cfg) - exact).abs().mean()
    code = "\n".join(code)
    assert "qconv" in code or "qlinear" in code  # oneDNN's int8 convolution / linear ops, not float ones


def test_int8_model_samples_only_on_the_cpu_and_refuses_what_cannot_work():
    quantize()
    loaded = inference.load_model("tiny-int8")
    with pytest.raises(utils.UsageError, match="runs on the CPU"):
        inference.prepare_for_sampling(loaded.model, torch.device("cuda"))
    with pytest.raises(utils.UsageError, match="already compressed"):
        compress.run(*compress.parse_options(["quantize", "--run-name", "tiny-int8", *SAMPLING]))
    tiny_checkpoint("trained", 0, seed=1)
    with pytest.raises(utils.UsageError, match="holds the checkpoints of another run"):
        compress.run(*compress.parse_options(["quantize", "--run-name", "tiny", "--output", "trained", *SAMPLING]))
    with pytest.raises(utils.UsageError, match="--calibration-images"):
        compress.run(*compress.parse_options(["quantize", "--run-name", "tiny", "--calibration-images", "0"]))
    with pytest.raises(SystemExit):
        compress.parse_options(["quantize", "--mode", "int4"])


def test_a_compressed_checkpoint_cannot_be_trained_on():
    quantize("--mode", "bf16")
    state = utils.load_checkpoint("checkpoints/tiny-bf16/last.pt")
    cfg = inference.load_model("tiny-bf16").cfg
    training_state = training.TrainingState(cfg, torch.device("cpu"), None, total_steps=10)
    with pytest.raises(utils.CheckpointError, match="training cannot continue"):
        training_state.restore(state)


def test_benchmark_times_the_sampling_of_a_run_and_its_compressed_copy_in_turns(capsys):
    quantize("--mode", "bf16")
    opts = benchmark.BenchmarkOptions(runs="tiny,tiny-bf16", batch_size=2, sample_steps=1, iters=1, warmup=0,
                                      device="cpu", amp="none")
    benchmark.run(opts)
    table = capsys.readouterr().out
    header = next(line for line in table.splitlines() if "tiny-bf16" in line and "tiny/tiny-bf16" in line)
    assert header
    rows = {line[:26].strip(): line[26:].split() for line in table.splitlines() if line[:26].strip()}
    assert rows["train img/s"][:2] == ["n/a", "n/a"]  # checkpoints are only sampled
    assert all(float(value) > 0 for value in rows["sample img/s"])
    assert rows["GFLOP / image (forward)"][0] == rows["GFLOP / image (forward)"][1]  # the same U-Net
