"""sample.py: samplers and output formats, the reverse-process GIF, SDEdit, inpainting, guidance, class labels,
outputs that never overwrite, and one clear sentence for every bad input.

Each test works in its own temporary folder (sample.py reads checkpoints/ and writes results/ relative to the
working directory) with two tiny hand-made checkpoints: `uncond` and `cond` (4 shapes classes), 16x16, T = 20.
"""

import copy
import csv
import dataclasses
import re
from pathlib import Path

import imageio.v3 as iio
import numpy as np
import pytest
import torch
from torch._inductor import config as inductor_config

import config
import dataset
import sample
import inference
import utils
from conftest import tiny_checkpoint
from diffusion import GaussianDiffusion, create_diffusion, make_beta_schedule
from samplers import SAMPLERS

FAST = ["--num-samples", "4", "--steps", "4"]


@pytest.fixture(autouse=True)
def checkpoints(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    yield {"uncond": tiny_checkpoint("uncond", 0, seed=0), "cond": tiny_checkpoint("cond", 4, seed=1)}


def run_sample(*flags):
    """Run sample.main in-process; returns the exit code (0 when it returned normally)."""
    try:
        sample.main([str(flag) for flag in flags])
    except SystemExit as exit:
        return exit.code or 0
    return 0


def only_file(folder, pattern="*"):
    files = sorted(Path(folder).glob(pattern))
    assert len(files) == 1, files
    return files[0]


def npz_of(run, *flags):
    """Run sample.py with --format npz and return its arr_0 (and arr_1 when written)."""
    assert run_sample("--run-name", run, "--format", "npz", *flags) == 0
    with np.load(only_file(Path("results/images") / run, "*.npz")) as data:
        return {key: data[key] for key in data.files}


def loaded(run, use_ema=True, prepared=True):
    """(model, diffusion, cfg) of a tiny checkpoint, as sample.py loads it (on the CPU, amp none), and by default
    prepared for sampling as sample.py prepares it."""
    path = Path("checkpoints") / run / "last.pt"
    model, cfg = inference.load_model_from_checkpoint(path, utils.load_checkpoint(path), use_ema)
    if prepared:
        model = inference.prepare_for_sampling(model, torch.device("cpu"))
    return model, create_diffusion(cfg), cfg


def options(**changes):
    values = dict(num_samples=4, batch_size=4, steps=4, sampler="ddim")
    return sample.SampleOptions(**{**values, **changes})


def generate(model, diffusion, cfg, **changes):
    """inference.generate, as sample.py calls it, with FAST's settings: 4 images, 4 DDIM steps, on the CPU.
    `changes` are SamplingOptions fields (sampler, seed, guidance_scale, ...) or generate's own arguments."""
    option_names = {field.name for field in dataclasses.fields(inference.SamplingOptions)}
    opts = inference.SamplingOptions(**{"sampler": "ddim", "steps": 4,
                                        **{k: v for k, v in changes.items() if k in option_names}})
    settings = {"num_samples": 4, "batch_size": 4, "device": torch.device("cpu"),
                **{k: v for k, v in changes.items() if k not in option_names}}
    return inference.generate(model, diffusion, cfg, opts, settings.pop("num_samples"), **settings)


def write_picture(path, pixels):
    iio.imwrite(path, pixels)
    return path


def random_picture(path, seed):
    pixels = np.random.default_rng(seed).integers(0, 256, (16, 16, 3), dtype=np.uint8)
    return write_picture(path, pixels), pixels


# --- samplers, formats and the checkpoint ----------------------------------------------------------------

@pytest.mark.parametrize("sampler", SAMPLERS)
def test_every_sampler_gives_finite_varied_images_and_npz_holds_them(sampler):
    model, diffusion, cfg = loaded("uncond")
    images = generate(model, diffusion, cfg, sampler=sampler)
    assert images.shape == (4, 3, 16, 16) and images.dtype == torch.float32
    assert torch.isfinite(images).all() and images.min() >= -1 and images.max() <= 1
    assert images.std() > 0.1  # not a constant picture

    arrays = npz_of("uncond", "--sampler", sampler, *FAST)
    assert arrays["arr_0"].shape == (4, 16, 16, 3) and arrays["arr_0"].dtype == np.uint8
    assert "arr_1" not in arrays  # no labels for an unconditional model
    np.testing.assert_array_equal(arrays["arr_0"], utils.to_uint8(images))  # the same seed, the same samples


def test_default_steps_follow_the_sampler_and_are_capped_at_T():
    _, _, cfg = loaded("uncond")
    steps = {sampler: sample.check_against_model(options(sampler=sampler, steps=0), cfg)
             for sampler in SAMPLERS}
    assert steps == {"ddpm": 20, "ddim": 20, "dpmpp2m": 20}  # T = 20 caps ddim's 100
    cfg_long = config.get_config("demo", timesteps=1000)
    steps = {sampler: sample.check_against_model(options(sampler=sampler, steps=0), cfg_long)
             for sampler in SAMPLERS}
    assert steps == {"ddpm": 1000, "ddim": 100, "dpmpp2m": 20}


def test_batches_do_not_change_deterministic_samples():
    # All noise comes from one generator in order, so DDIM (eta 0) gives the same images in any batch split.
    model, diffusion, cfg = loaded("uncond")
    whole = generate(model, diffusion, cfg, num_samples=5, batch_size=5)
    split = generate(model, diffusion, cfg, num_samples=5, batch_size=2)
    assert split.shape == (5, 3, 16, 16)
    torch.testing.assert_close(split, whole, atol=1e-4, rtol=0)


def test_one_progress_bar_counts_the_images_of_every_batch_step_by_step(capsys):
    assert run_sample("--run-name", "uncond", "--num-samples", "5", "--batch-size", "2", "--steps", "4") == 0
    err = capsys.readouterr().err
    assert "5/5 images" in err and "img/s" in err
    counts = [int(match) for match in re.findall(r"\| (\d+)/5 images", err)]
    assert counts[0] == 0 and counts[-1] == 5 and set(counts) <= set(range(6))
    random_picture("input.png", seed=0)
    assert run_sample("--run-name", "uncond", "--init-image", "input.png", "--strength", "0.5", *FAST) == 0
    assert "4/4 images" in capsys.readouterr().err


def test_pretrained_weights_sample_with_the_ddpm_cifar10_config(monkeypatch, capsys):
    model, _, _ = loaded("uncond")
    monkeypatch.setattr(inference, "load_pretrained", lambda path: model)  # the U-Net is convolutional: 32x32 works
    arrays = npz_of("pretrained", "--pretrained", "some/folder", "--num-samples", "2", "--steps", "2")
    assert arrays["arr_0"].shape == (2, 32, 32, 3)
    assert run_sample("--pretrained", "some/folder", "--steps", "1001") != 0
    assert "more than the model's 1000 timesteps" in capsys.readouterr().err


def test_png_format_writes_one_image_per_sample():
    assert run_sample("--run-name", "uncond", "--format", "png", "--num-samples", "3", "--steps", "2") == 0
    folder = only_file("results/images/uncond")
    assert folder.is_dir() and folder.name == "samples_ddim_2steps"
    pictures = sorted(folder.glob("*.png"))
    assert [p.name for p in pictures] == ["000000.png", "000001.png", "000002.png"]
    assert iio.imread(pictures[0]).shape == (16, 16, 3)


def test_outputs_never_overwrite_and_every_path_is_printed(capsys):
    for _ in range(2):
        assert run_sample("--run-name", "uncond", *FAST) == 0
    files = sorted(Path("results/images/uncond").iterdir())
    assert [f.name for f in files] == ["samples_ddim_4steps.png", "samples_ddim_4steps_1.png"]
    out = capsys.readouterr().out
    assert all(str(f) in out for f in files)


def test_sampling_uses_the_checkpoint_config_and_its_ema_weights():
    ema = npz_of("uncond", *FAST)["arr_0"]
    assert ema.shape[1:3] == (16, 16)  # the checkpoint's image size, not today's default of 32
    model, diffusion, cfg = loaded("uncond", use_ema=True)
    expected = utils.to_uint8(generate(model, diffusion, cfg))
    np.testing.assert_array_equal(ema, expected)

    raw = npz_of("uncond-raw", "--checkpoint", "checkpoints/uncond/last.pt", "--no-ema", *FAST)["arr_0"]
    model, diffusion, cfg = loaded("uncond", use_ema=False)
    np.testing.assert_array_equal(raw, utils.to_uint8(generate(model, diffusion, cfg)))
    assert not np.array_equal(raw, ema)


def test_a_corrupt_last_checkpoint_falls_back_to_the_newest_step_file(capsys):
    run_dir = Path("checkpoints/uncond")
    (run_dir / "last.pt").rename(run_dir / "step_0000010.pt")
    (run_dir / "last.pt").write_bytes(b"not a checkpoint")
    assert run_sample("--run-name", "uncond", *FAST) == 0
    assert "step_0000010.pt" in capsys.readouterr().out


# --- seeing the process ----------------------------------------------------------------------------------

def test_gif_has_one_frame_per_step_plus_the_finished_samples():
    assert run_sample("--run-name", "uncond", "--gif", "--num-samples", "3", "--steps", "5") == 0
    gif = only_file("results/images/uncond", "*.gif")
    assert gif.name == "process_ddim_5steps.gif"
    frames = iio.imread(gif, index=None)
    assert frames.shape[0] == 5 + 1
    assert only_file("results/images/uncond", "*_strip.png").name == "process_ddim_5steps_strip.png"
    assert not list(Path("results/images/uncond").glob("samples_*"))  # --gif replaces the sample grid


def test_gif_frames_are_capped(monkeypatch):
    monkeypatch.setattr(sample, "GIF_MAX_FRAMES", 4)
    assert run_sample("--run-name", "cond", "--gif", "--num-samples", "2", "--sampler", "ddpm") == 0
    frames = iio.imread(only_file("results/images/cond", "*.gif"), index=None)
    assert frames.shape[0] == 4 + 1  # 4 of the 20 steps, evenly spread, and the finished samples


def test_figures_are_drawn_instead_of_samples():
    log_dir = Path("results/logs/uncond")
    log_dir.mkdir(parents=True)
    with open(log_dir / "metrics.csv", "w", newline="") as f:
        csv.writer(f).writerows([["step", "epoch", "loss", "lr"], [1, 0, 1.0, 1e-3], [2, 0, 0.5, 1e-3]])
    assert run_sample("--run-name", "uncond", "--forward-figure", "--plot-loss") == 0
    names = sorted(path.name for path in Path("results/plots/uncond").iterdir())
    assert names == ["forward.png", "loss.png", "schedules.png"]
    assert not Path("results/images/uncond").exists()
    assert sample.visualize.evenly_spaced(1000, 10)[::9] == [0, 999]


def test_forward_figure_shows_x0_then_the_papers_x_t():
    """Columns: the clean images (t = 0), then x_t at the paper's steps t = 2, 5, 10, 15, 20 of T = 20, which are
    table indices t - 1 (x_1 is one step of noise, never the data)."""
    _, diffusion, cfg = loaded("uncond")
    captured = {}
    original = sample.visualize.forward_process_figure

    def capture(columns, path, title):
        captured["columns"] = columns
        return original(columns, path, title)

    sample.visualize.forward_process_figure = capture
    try:
        sample.forward_figure(cfg, diffusion, 0, Path("plots"))
    finally:
        sample.visualize.forward_process_figure = original
    columns = captured["columns"]
    images = sample.real_images(cfg, sample.FORWARD_IMAGES)
    alpha_bars = torch.cumprod(1 - make_beta_schedule("linear", 20), dim=0)
    eps = torch.randn(images.shape, generator=torch.Generator().manual_seed(0))
    assert [t for t, _, _ in columns] == [0, 2, 5, 10, 15, 20]
    assert columns[0][1] == 1.0 and torch.equal(columns[0][2], images)
    for t, alpha_bar, x_t in columns[1:]:
        assert alpha_bar == pytest.approx(alpha_bars[t - 1].item(), rel=1e-6)
        expected = alpha_bars[t - 1].sqrt() * images + (1 - alpha_bars[t - 1]).sqrt() * eps
        torch.testing.assert_close(x_t.double(), expected.double(), atol=1e-5, rtol=1e-5)


# --- image to image ----------------------------------------------------------------------------------------

def test_sdedit_strength_zero_returns_the_input():
    path, pixels = random_picture("input.png", seed=0)
    arrays = npz_of("uncond", "--init-image", path, "--strength", "0", *FAST)
    assert arrays["arr_0"].shape == (4, 16, 16, 3)
    for image in arrays["arr_0"]:
        assert np.abs(image.astype(int) - pixels).max() <= 1


def test_sdedit_strength_one_ignores_the_input_and_lower_strengths_do_not():
    first, _ = random_picture("first.png", seed=0)
    second, _ = random_picture("second.png", seed=1)

    outputs = {}
    for path in (first, second):
        for strength in ("1", "0.5"):
            arrays_dir = Path(f"out/{path}{strength}")
            assert run_sample("--run-name", "uncond", "--format", "npz", "--init-image", path, "--strength",
                              strength, "--out", arrays_dir, *FAST) == 0
            with np.load(only_file(arrays_dir, "*.npz")) as data:
                outputs[path, strength] = data["arr_0"]
    np.testing.assert_array_equal(outputs[first, "1"], outputs[second, "1"])
    assert not np.array_equal(outputs[first, "0.5"], outputs[second, "0.5"])


def test_sdedit_noises_the_input_to_strength_times_T_with_eq4():
    """Strength 0.5 of T = 20: x_t0 = sqrt(alpha_bar) x0 + sqrt(1 - alpha_bar) eps at the paper's t0 = 10 (table
    index 9), eps image i's first draw from its own generator (seed 5); then only the ceil(0.5 x 4) = 2 steps below
    t0 run."""
    path, pixels = random_picture("input.png", seed=0)
    model, diffusion, cfg = loaded("uncond")
    init_image = sample.load_init_image(path, cfg)
    _, trajectory = generate(model, diffusion, cfg, init_image=init_image, strength=0.5, seed=5,
                             return_trajectory=True)
    alpha_bar = torch.cumprod(1 - make_beta_schedule("linear", 20), dim=0)[9]
    eps = torch.stack([torch.randn(3, 16, 16, generator=torch.Generator().manual_seed(inference.image_seed(5, i)))
                       for i in range(4)])
    expected = alpha_bar.sqrt() * init_image.double() + (1 - alpha_bar).sqrt() * eps.double()
    assert [t for t, _, _ in trajectory] == [9, 4]
    torch.testing.assert_close(trajectory[0][1].double(), expected, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(init_image, torch.from_numpy(pixels).permute(2, 0, 1)[None] / 127.5 - 1)


def test_a_one_channel_model_samples_end_to_end():
    tiny_checkpoint("gray", 0, seed=2, dataset="folder", channels=1)
    arrays = npz_of("gray", *FAST)
    images = arrays["arr_0"]
    assert images.shape == (4, 16, 16, 3)  # grayscale written as RGB with three equal channels
    assert np.array_equal(images[..., 0], images[..., 1]) and np.array_equal(images[..., 0], images[..., 2])
    assert images.std() > 0 and not np.array_equal(images[0], images[1])
    assert run_sample("--run-name", "gray", "--gif", *FAST) == 0
    assert run_sample("--run-name", "gray", *FAST) == 0
    grid = iio.imread(only_file("results/images/gray", "samples_*.png"))
    assert grid.ndim == 3 and grid.shape[-1] == 3
    assert len(list(Path("results/images/gray").glob("process_*.gif"))) == 1


def test_inpainting_keeps_the_black_pixels_of_the_mask_and_repaints_the_white():
    path, pixels = random_picture("input.png", seed=0)
    mask = np.zeros((16, 16), dtype=np.uint8)
    mask[:, 8:] = 255  # repaint the right half
    write_picture("mask.png", mask)
    arrays = npz_of("uncond", "--init-image", path, "--mask", "mask.png", *FAST)
    for image in arrays["arr_0"]:
        np.testing.assert_array_equal(image[:, :8], pixels[:, :8])
        assert np.abs(image[:, 8:].astype(int) - pixels[:, 8:]).mean() > 10


def test_image_to_image_grid_shows_the_input_first():
    path, pixels = random_picture("input.png", seed=0)
    assert run_sample("--run-name", "uncond", "--init-image", path, "--strength", "0.5", *FAST) == 0
    grid = iio.imread(only_file("results/images/uncond", "sdedit_*.png"))
    np.testing.assert_array_equal(grid[2:18, 2:18], pixels)  # make_grid pads every image by 2 pixels
    # --zoom 3: every pixel of the grid (input row, padding and samples) becomes a 3 x 3 block.
    assert run_sample("--run-name", "uncond", "--init-image", path, "--strength", "0.5", "--zoom", "3", *FAST) == 0
    zoomed = iio.imread(sorted(Path("results/images/uncond").glob("sdedit_*.png"))[-1])
    np.testing.assert_array_equal(zoomed[2:50, 2:50], np.repeat(np.repeat(pixels, 3, axis=0), 3, axis=1))
    rows = (grid.shape[0] - 2) // 18
    assert zoomed.shape[0] == rows * 50 + 2  # the 2-pixel gaps between images stay 2 pixels


# --- labels and guidance -----------------------------------------------------------------------------------

def test_class_names_and_indices_map_to_labels():
    names = dataset.CIFAR10_CLASSES
    assert sample.parse_class_labels(["cat", "truck", "7", "Airplane"], names) == [3, 9, 7, 0]
    assert sample.parse_class_labels(["all"], names) == list(range(10))
    with pytest.raises(sample.UsageError, match="unknown class 'unicorn'.*3 cat"):
        sample.parse_class_labels(["unicorn"], names)
    with pytest.raises(sample.UsageError, match="unknown class '10'"):
        sample.parse_class_labels(["10"], names)


def test_labels_are_spread_over_the_classes_in_blocks():
    assert npz_of("cond", "--num-samples", "8", "--steps", "2")["arr_1"].tolist() == [0, 0, 1, 1, 2, 2, 3, 3]


def test_class_label_and_class_grid_choose_the_rows():
    arrays = npz_of("cond", "--class-grid", "--class-label", "cross", "0", "--num-samples", "7", "--steps", "2")
    assert arrays["arr_1"].tolist() == [3, 3, 3, 0, 0, 0]  # 7 // 2 = 3 per row
    assert arrays["arr_0"].shape[0] == 6


def test_guidance_scale_zero_is_the_unconditional_model():
    model, diffusion, cfg = loaded("cond")
    cat = torch.full((4,), 2)
    guided = generate(model, diffusion, cfg, guidance_scale=0.0, labels=cat)
    null = torch.full((4,), cfg.num_classes)  # the null label
    unconditional = generate(model, diffusion, cfg, labels=null)
    torch.testing.assert_close(guided, unconditional, atol=1e-4, rtol=0)


def test_guidance_scale_one_is_the_conditional_model_alone():
    model, diffusion, cfg = loaded("cond")
    labels = torch.tensor([0, 1, 2, 3])
    seen = []

    def recording_model(x_t, t, y):
        seen.append(y.clone())
        return model(x_t, t, y)

    conditional = generate(recording_model, diffusion, cfg, labels=labels)
    assert all(torch.equal(y, labels) for y in seen)  # never the null label: no unconditional pass at w = 1
    other = generate(model, diffusion, cfg, labels=labels.flip(0))
    assert not torch.allclose(conditional, other)  # and the labels matter


def test_guidance_scale_mixes_conditional_and_unconditional_predictions():
    model, diffusion, cfg = loaded("cond")
    labels = torch.tensor([0, 1, 2, 3])
    w = 3.0

    def guided_by_hand(x_t, t, y):
        unconditional = model(x_t, t, torch.full_like(y, cfg.num_classes))
        return unconditional + w * (model(x_t, t, y) - unconditional)

    expected = generate(guided_by_hand, diffusion, cfg, labels=labels)
    guided = generate(model, diffusion, cfg, guidance_scale=w, labels=labels)
    torch.testing.assert_close(guided, expected, atol=1e-3, rtol=0)  # w = 3 amplifies batch-size rounding


# --- the diffusers export ----------------------------------------------------------------------------------

def test_export_writes_the_ema_weights_into_a_new_folder(monkeypatch, capsys):
    exported = {}
    monkeypatch.setattr(sample, "export_diffusers", lambda model, folder: exported.update(model=model) or folder)
    assert run_sample("--run-name", "uncond", "--export-diffusers", "out/diffusers") == 0
    ema = utils.load_checkpoint("checkpoints/uncond/last.pt")["ema"]
    assert all(torch.equal(value, ema[name]) for name, value in exported["model"].state_dict().items())
    assert "out/diffusers" in capsys.readouterr().out
    assert not Path("results/images").exists()  # exported, and stopped

    Path("full").mkdir()
    (Path("full") / "config.json").write_text("{}")
    assert run_sample("--run-name", "uncond", "--export-diffusers", "full") != 0


# --- bad input: one sentence and a non-zero exit -----------------------------------------------------------

BAD_INPUTS = {
    "unknown run": (["--run-name", "nope"], "run 'nope' has no checkpoint in checkpoints/nope (runs with "
                                            "checkpoints: cond, uncond); choose one with --run-name, or train one "
                                            "with `python train.py --preset demo`"),
    "missing checkpoint": (["--checkpoint", "missing.pt"], "checkpoint missing.pt does not exist"),
    "zero zoom": (["--run-name", "uncond", "--zoom", "0"], "--zoom must be at least 1, got 0"),
    "corrupt checkpoint": (["--checkpoint", "corrupt.pt"], "checkpoint corrupt.pt cannot be read"),
    "too many steps": (["--run-name", "uncond", "--steps", "21"], "--steps 21 is more than the model's 20 "
                                                                  "timesteps"),
    "zero samples": (["--run-name", "uncond", "--num-samples", "0"], "--num-samples must be at least 1, got 0"),
    "negative samples": (["--run-name", "uncond", "--num-samples", "-3"], "--num-samples must be at least 1, got -3"),
    "zero batch": (["--run-name", "uncond", "--batch-size", "0"], "--batch-size must be at least 1, got 0"),
    "label on unconditional": (["--run-name", "uncond", "--class-label", "cat"], "trained without labels"),
    "grid on unconditional": (["--run-name", "uncond", "--class-grid"], "trained without labels"),
    "unknown class": (["--run-name", "cond", "--class-label", "cat"], "unknown class 'cat'; the model's classes "
                                                                      "are 0 circle, 1 square, 2 triangle, 3 cross"),
    "negative guidance": (["--run-name", "cond", "--guidance-scale", "-1"], "--guidance-scale must be 0 or more"),
    "guidance unconditional": (["--run-name", "uncond", "--guidance-scale", "3"], "needs a model trained with "
                                                                                  "labels"),
    "strength too large": (["--run-name", "uncond", "--init-image", "text.png", "--strength", "1.5"],
                           "--strength must be in [0, 1]"),
    "unreadable image": (["--run-name", "uncond", "--init-image", "text.png"], "cannot read the image text.png"),
    "missing mask": (["--run-name", "uncond", "--init-image", "input.png", "--mask", "nomask.png"],
                     "cannot read the image nomask.png"),
    "mask alone": (["--run-name", "uncond", "--mask", "input.png"], "--mask needs --init-image"),
    "eta with ddpm": (["--run-name", "uncond", "--sampler", "ddpm", "--eta", "0.5"], "only applies to --sampler ddim"),
    "fp16 on cpu": (["--run-name", "uncond", "--device", "cpu", "--amp", "fp16"], "--amp fp16 needs a CUDA GPU"),
    "unknown format": (["--run-name", "uncond", "--format", "jpg"], "unknown format 'jpg'"),
    "export other model": (["--run-name", "uncond", "--export-diffusers", "exported"],
                           "only a U-Net with the ddpm-cifar10 architecture converts"),
    "pretrained not a model": (["--pretrained", "empty"], "has no config.json"),
    "no training log": (["--run-name", "uncond", "--plot-loss"], "--plot-loss needs the training log"),
    "ddpm variance, other sampler": (["--run-name", "uncond", "--sampler", "ddim", "--ddpm-variance", "large"],
                                     "only applies to --sampler ddpm"),
    "dynamic threshold of 1": (["--run-name", "uncond", "--dynamic-threshold", "1"], "--dynamic-threshold must be"),
}


def test_an_unknown_sampler_is_refused_with_the_registered_choices(capsys):
    with pytest.raises(SystemExit) as exit:
        sample.parse_options(["--sampler", "euler"])
    assert exit.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]  # argparse: the usage, then one sentence
    assert "argument --sampler: invalid choice: 'euler'" in err and all(name in err for name in SAMPLERS)


@pytest.mark.parametrize("case", BAD_INPUTS)
def test_bad_input_gets_one_sentence_and_a_non_zero_exit(case, capsys):
    flags, message = BAD_INPUTS[case]
    Path("corrupt.pt").write_bytes(b"\x80\x02 truncated")
    Path("text.png").write_text("this is not a picture")
    random_picture("input.png", seed=0)
    Path("empty").mkdir()
    assert run_sample(*flags) != 0
    err = capsys.readouterr().err
    assert err.startswith("error: ") and message in err
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1


@pytest.mark.parametrize("flags,variance,threshold", [
    ([], "auto", 0.0), (["--ddpm-variance", "large", "--dynamic-threshold", "0.995"], "large", 0.995)])
def test_ddpm_variance_and_dynamic_threshold_reach_the_sampler(monkeypatch, flags, variance, threshold):
    seen = []
    original = sample.create_diffusion(config.get_config("demo")).sample.__func__

    def recording(self, *args, **kwargs):
        seen.append((kwargs["ddpm_variance"], kwargs["dynamic_threshold"]))
        return original(self, *args, **kwargs)

    monkeypatch.setattr("diffusion.GaussianDiffusion.sample", recording)
    assert run_sample("--run-name", "uncond", "--sampler", "ddpm", *flags, *FAST) == 0
    assert seen == [(variance, threshold)]
    assert only_file("results/images/uncond").name == ("samples_ddpm_4steps_large_dt0.995.png" if flags
                                                        else "samples_ddpm_4steps.png")


# --- the fast path: inference.prepare_for_sampling ------------------------------------------------------

def test_prepared_model_gives_the_samples_of_the_plain_model():
    # Channels-last changes only where the numbers lie in memory: the same samples, up to float32 rounding.
    model, diffusion, cfg = loaded("uncond", prepared=False)
    plain = generate(model, diffusion, cfg)
    prepared = inference.prepare_for_sampling(copy.deepcopy(model), torch.device("cpu"))
    assert prepared.out_conv.weight.is_contiguous(memory_format=torch.channels_last)
    torch.testing.assert_close(generate(prepared, diffusion, cfg), plain, atol=1e-5, rtol=0)


def test_prepared_model_stores_the_weights_autocast_would_use():
    # With bf16, convolutions and linear layers hold the bf16 weights autocast would cast to; GroupNorm keeps
    # float32. So the network computes what it computes under autocast alone, up to the order of float sums.
    model, diffusion, cfg = loaded("cond", prepared=False)
    prepared = inference.prepare_for_sampling(copy.deepcopy(model), torch.device("cpu"), torch.bfloat16)
    assert prepared.out_conv.weight.dtype == torch.bfloat16 and prepared.time_mlp[0].weight.dtype == torch.bfloat16
    assert all(module.weight.dtype == torch.float32 for module in prepared.modules()
               if isinstance(module, torch.nn.GroupNorm))
    x = torch.randn(4, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    t, y = torch.tensor([0, 5, 10, 19]), torch.tensor([0, 1, 2, 4])  # 4 = the null label
    with torch.no_grad(), torch.autocast("cpu", torch.bfloat16):
        expected, got = model(x, t, y).float(), prepared(x, t, y).float()
    assert (got - expected).abs().max() < 0.02 * expected.abs().max()  # bf16 keeps 8 bits: 0.4% per rounding
    images = generate(prepared, diffusion, cfg, amp_dtype=torch.bfloat16, labels=torch.tensor([0, 1, 2, 3]))
    assert torch.isfinite(images).all() and images.std() > 0.1


def test_compiled_model_gives_the_samples_of_the_eager_one(monkeypatch):
    monkeypatch.setattr(inductor_config, "freezing", False)  # prepare_for_sampling sets it; restored afterwards
    model, diffusion, cfg = loaded("uncond", prepared=False)
    eager = generate(model, diffusion, cfg)
    compiled = inference.prepare_for_sampling(copy.deepcopy(model), torch.device("cpu"), compile=True)
    assert isinstance(compiled, torch._dynamo.eval_frame.OptimizedModule) and inductor_config.freezing
    try:
        torch.testing.assert_close(generate(compiled, diffusion, cfg), eager, atol=1e-4, rtol=0)
    finally:
        torch._dynamo.reset()  # forget the compiled graphs


@pytest.mark.parametrize("flags, compile", [((), False), (("--compile",), True)])
def test_compile_flag_reaches_prepare_for_sampling(monkeypatch, flags, compile):
    seen = []
    prepare = inference.prepare_for_sampling
    monkeypatch.setattr(inference, "prepare_for_sampling", lambda model, device, amp_dtype, compile:
                        seen.append((amp_dtype, compile)) or prepare(model, device, amp_dtype))
    assert run_sample("--run-name", "uncond", "--amp", "bf16", *flags, *FAST) == 0
    assert seen == [(torch.bfloat16, compile)]


def test_bf16_guided_samples_are_those_of_the_prepared_model():
    # sample.py --amp bf16 with guidance: the bf16-weight network under autocast, batched with the null label.
    arrays = npz_of("cond", "--amp", "bf16", "--guidance-scale", "3", *FAST)
    model, diffusion, cfg = loaded("cond", prepared=False)
    model = inference.prepare_for_sampling(model, torch.device("cpu"), torch.bfloat16)
    images = generate(model, diffusion, cfg, amp_dtype=torch.bfloat16, guidance_scale=3.0,
                      labels=torch.tensor([0, 1, 2, 3]))
    np.testing.assert_array_equal(arrays["arr_0"], utils.to_uint8(images))
    np.testing.assert_array_equal(arrays["arr_1"], [0, 1, 2, 3])
    plain, _, _ = loaded("cond", prepared=False)  # float32: another network, other pixels, the same picture
    reference = generate(plain, diffusion, cfg, guidance_scale=3.0, labels=torch.tensor([0, 1, 2, 3]))
    assert (images - reference).abs().mean() < 0.05


def test_timestep_spacing_reaches_the_sampler_and_names_the_output(monkeypatch):
    seen = []
    original = GaussianDiffusion.sample

    def recording_sample(self, *args, **kwargs):
        seen.append(kwargs.get("skip_type"))
        return original(self, *args, **kwargs)

    monkeypatch.setattr(GaussianDiffusion, "sample", recording_sample)
    assert run_sample("--run-name", "uncond", "--timestep-spacing", "karras", *FAST) == 0
    assert seen == ["karras"] and only_file("results/images/uncond").name == "samples_ddim_4steps_karras.png"
    assert run_sample("--run-name", "uncond", "--timestep-spacing", "even", *FAST) != 0  # argparse's choices
