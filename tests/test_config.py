"""config.py: presets, validation messages, flags built from the dataclass, JSON round trip."""

import argparse
import dataclasses
import importlib
import json
from pathlib import Path

import pytest

import config


def parse(*argv):
    parser = config.add_config_flags(argparse.ArgumentParser())
    return config.config_from_args(parser.parse_args(list(argv)))


@pytest.mark.parametrize("preset", list(config.PRESETS))
def test_every_preset_is_valid_and_named(preset):
    cfg = config.get_config(preset)
    assert cfg.preset == preset
    assert cfg.name == preset


def test_ddpm_preset_is_the_papers_recipe():
    cfg = config.get_config("ddpm-cifar10")
    assert (cfg.base_channels, cfg.channel_mults, cfg.num_res_blocks, cfg.attn_resolutions) == (
        128, (1, 2, 2, 2), 2, (16,))
    assert (cfg.dropout, cfg.timesteps, cfg.beta_schedule, cfg.lr, cfg.warmup_steps) == (
        0.1, 1000, "linear", 2e-4, 5000)
    assert (cfg.batch_size, cfg.max_steps, cfg.grad_clip, cfg.ema_decay, cfg.lr_schedule) == (
        128, 800_000, 1.0, 0.9999, "constant")


def test_cifar10_preset_is_the_design_sketch_recipe():
    cfg = config.get_config()
    widths = [cfg.base_channels * mult for mult in cfg.channel_mults]
    assert widths == [64, 128, 256, 512]
    assert (cfg.num_heads, cfg.batch_size, cfg.epochs, cfg.lr_schedule, cfg.random_flip) == (
        8, 64, 100, "cosine", True)


@pytest.mark.parametrize("overrides, message", [
    (dict(image_size=0), "image_size must be a positive integer"),
    (dict(batch_size=-1), "batch_size must be a positive integer"),
    (dict(timesteps=0), "timesteps must be a positive integer"),
    (dict(lr=0.0), "lr must be positive"),
    (dict(max_steps=-5), "max_steps must be zero or positive"),
    (dict(epochs=0, max_steps=0), "training never ends"),
    (dict(dataset="imagenet"), "dataset must be one of"),
    (dict(beta_schedule="sigmoid"), "beta_schedule must be one of"),
    (dict(objective="score"), "objective must be one of"),
    (dict(loss_weighting="p2"), "loss_weighting must be one of"),
    (dict(lr_schedule="step"), "lr_schedule must be one of"),
    (dict(amp="fp8"), "amp must be one of"),
    (dict(device="tpu"), "device must be one of"),
    (dict(ema_decay=1.0), "ema_decay must be in [0, 1)"),
    (dict(ema_decay=-0.1), "ema_decay must be in [0, 1)"),
    (dict(dropout=1.0), "dropout must be in [0, 1)"),
    (dict(cond_drop_prob=1.5), "cond_drop_prob must be in [0, 1)"),
    (dict(grad_clip=-1.0), "grad_clip must be zero (off) or positive"),
    (dict(image_size=36), "cannot be halved 3 times"),
    (dict(attn_resolutions=(16, 3)), "attn_resolutions has 3"),
    (dict(base_channels=48), "multiple of 32 for GroupNorm"),
    (dict(num_heads=3), "num_heads 3 must divide"),
    (dict(channel_mults=()), "channel_mults must be a non-empty list"),
    (dict(channels=2), "channels must be 1 or 3"),
    (dict(channels=1), "dataset cifar10 has 3 channel(s)"),
    (dict(num_classes=7), "dataset cifar10 has 10 classes"),
    (dict(grad_accum=0), "grad_accum must be a positive integer"),
])
def test_impossible_values_are_rejected_with_one_sentence(overrides, message):
    with pytest.raises(config.ConfigError) as error:
        config.get_config("cifar10", **overrides)
    assert message in str(error.value)
    assert "\n" not in str(error.value)


def test_unknown_preset_and_field_are_rejected():
    with pytest.raises(config.ConfigError, match="preset must be one of"):
        config.get_config("imagenet")
    with pytest.raises(config.ConfigError, match="unknown config field"):
        config.get_config("cifar10", learning_rate=1e-3)


def test_flags_override_the_preset_and_only_what_was_typed():
    cfg = parse("--preset", "mnist", "--lr", "1e-3", "--channel-mults", "1", "2", "--no-random-flip",
                "--compile", "--attn-resolutions")
    assert cfg.preset == "mnist"
    assert cfg.dataset == "mnist"  # from the preset
    assert cfg.base_channels == config.PRESETS["mnist"]["base_channels"]
    assert cfg.lr == 1e-3
    assert cfg.channel_mults == (1, 2)
    assert cfg.attn_resolutions == ()
    assert cfg.random_flip is False and cfg.compile is True


def test_every_field_has_a_flag_and_help():
    parser = config.add_config_flags(argparse.ArgumentParser())
    help_text = parser.format_help()
    for f in dataclasses.fields(config.Config):
        assert f.metadata["help"]
        # A field the scripts fill in (the vocabulary train.py builds) has no flag.
        assert ("--" + f.name.replace("_", "-") in help_text) == f.metadata["flag"], f.name
    # and how a pruned model's GroupNorms are grouped, which compress.py prune sets.
    assert [f.name for f in dataclasses.fields(config.Config) if not f.metadata["flag"]] == ["norm_groups",
                                                                                             "vocabulary"]


@pytest.mark.parametrize("script,argv", [
    ("train", []), ("sample", []), ("evaluate", []), ("benchmark", []), ("distill", []), ("dataset", []),
    ("quality", []), ("prompts", []), ("gaussian", []), ("compress", ["quantize"]), ("compress", ["prune"]),
])
def test_every_script_prints_its_help(script, argv, capsys):
    # argparse formats help strings with %: a help text saying "10%" once made compress.py prune --help a traceback.
    with pytest.raises(SystemExit) as exit:
        importlib.import_module(script).main([*argv, "--help"])
    assert exit.value.code == 0 and "--" in capsys.readouterr().out


def test_json_round_trip(tmp_path):
    cfg = config.get_config("demo", channel_mults=(1, 2), attn_resolutions=(16,), run_name="x")
    config.save_config(cfg, tmp_path / "config.json")
    # config.json is what a person reads (and TensorBoard shows): plain JSON that rebuilds the same config
    assert config.config_from_dict(json.loads((tmp_path / "config.json").read_text())) == cfg
    assert config.config_from_dict(config.config_to_dict(cfg)) == cfg


def test_old_saved_configs_get_new_fields_from_their_preset():
    values = config.config_to_dict(config.get_config("demo"))
    del values["max_bad_steps"]
    assert config.config_from_dict(values).max_bad_steps == config.get_config("demo").max_bad_steps
    with pytest.raises(config.ConfigError, match="does not know"):
        config.config_from_dict({**values, "future_field": 1})
    # A run saved before the power-function EMA keeps its plain EMA, though its preset (demo) now has the other.
    del values["ema_gamma"]
    assert config.config_from_dict(values).ema_gamma == 0


def test_naming_a_dataset_sets_its_channels_unless_given():
    assert config.get_config("cifar10", dataset="mnist").channels == 1
    assert parse("--dataset", "fashion_mnist").channels == 1
    with pytest.raises(config.ConfigError, match="dataset mnist has 1 channel"):
        config.get_config("cifar10", dataset="mnist", channels=3)


def test_the_labels_and_the_ema_of_a_preset_follow_what_was_given():
    assert config.get_config("demo").num_classes == 4  # the demo is class-conditional
    assert config.get_config("demo", dataset="mnist").num_classes == 10
    assert config.get_config("demo", dataset="folder", data_dir="x").num_classes == 0  # a folder's count is unknown
    assert config.get_config("demo", dataset="folder", data_dir="x", num_classes=3).num_classes == 3
    assert config.get_config("demo", text_encoder="transformer").num_classes == 0  # captions instead of labels
    assert parse("--preset", "demo", "--dataset", "folder", "--data-dir", "x").num_classes == 0
    assert config.get_config("cifar10", dataset="shapes").num_classes == 0  # an unconditional preset stays so
    # An EMA decay given to the demo, whose preset averages with the power function, means that EMA.
    assert config.get_config("demo").ema_gamma == 7 and config.get_config("demo", ema_decay=0.9).ema_gamma == 0
    assert config.get_config("demo", ema_decay=0.9, ema_gamma=5.0).ema_gamma == 5


@pytest.mark.parametrize("module_name, class_name", [
    ("config", "Config"), ("sample", "SampleOptions"), ("evaluate", "EvalOptions"),
    ("benchmark", "BenchmarkOptions"), ("distill", "DistillOptions"), ("compress", "CompressOptions")])
def test_readme_documents_every_flag(module_name, class_name):
    import importlib
    options = getattr(importlib.import_module(module_name), class_name)
    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text(encoding="utf-8")
    for f in dataclasses.fields(options):
        if f.name != "preset" and f.metadata.get("flag", True):
            assert f"`--{f.name.replace('_', '-')}" in readme, f"README.md does not document --{f.name}"
