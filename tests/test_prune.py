"""pruning.py, compress.py prune and train.py --init-from: the pruned U-Net keeps its inputs, outputs and
connections with fewer channels, its checkpoint loads without the pruning library, and its fine-tuning is an
ordinary run (starts as the pruned model, resumes bit for bit).

Each test works in its own temporary folder with a tiny hand-made checkpoint (16x16, T = 20).
"""

import math
import sys

import pytest
import torch

import benchmark
import compress
import config
import inference
import model as unet
import pruning
import quantization
import train
import training
import utils
from conftest import tiny_checkpoint
from diffusion import create_diffusion

PRUNE = ["--importance-batches", "1", "--batch-size", "4", "--compare-images", "0", "--finetune-steps", "0"]
TRAIN_FLAGS = ["--batch-size", "4", "--num-workers", "0", "--sample-every", "0", "--device", "cpu",
               "--lr-schedule", "constant", "--warmup-steps", "0"]


@pytest.fixture(autouse=True)
def run(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    return tiny_checkpoint("tiny", 0, seed=0, step=40)


def prune(*flags):
    """compress.py prune on the tiny run; returns the path it wrote and the file, read with weights_only."""
    path = compress.run(*compress.parse_options(["prune", "--run-name", "tiny", *PRUNE, *flags]))
    return path, utils.load_checkpoint(path)


def outputs(model, cfg, y=None, seed=1, batch=3):
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, cfg.channels, cfg.image_size, cfg.image_size, generator=generator)
    t = torch.randint(0, cfg.timesteps, (batch,), generator=generator)
    with torch.no_grad():
        return model(x, t) if y is None else model(x, t, y)


def is_subsequence(small, large):
    """Whether the values of `small` appear in `large` in the same order (what pruning a 1-D tensor leaves)."""
    values = iter(large.tolist())
    return all(any(value == other for other in values) for value in small.tolist())


@pytest.mark.parametrize("num_classes", [0, 4])
def test_pruning_removes_channels_group_by_group_and_keeps_what_goes_in_and_out(num_classes):
    tiny_checkpoint("labelled", num_classes, seed=1)
    loaded = inference.load_model("labelled")
    cfg = loaded.cfg
    original = {name: tensor.clone() for name, tensor in loaded.model.state_dict().items()}
    batches = [(torch.rand(4, 3, 16, 16) * 2 - 1, torch.tensor([0, 1, 2, 3]) if num_classes else None)]
    pruned = pruning.prune_unet(loaded.model, create_diffusion(cfg), batches, 0.5, cfg)
    params, flops = pruning.size_of(pruned, cfg)
    full_params, full_flops = pruning.size_of(unet.create_model(cfg), cfg)
    assert params < 0.5 * full_params and flops < 0.45 * full_flops  # the first level too (else 0.6)
    y = torch.tensor([2, 0, 4]) if num_classes else None  # 4: the null label
    assert outputs(pruned, cfg, y).shape == (3, 3, 16, 16)
    state = pruned.state_dict()
    assert state["stem.weight"].shape[1] == 3 and state["out_conv.weight"].shape[0] == 3  # the image's channels
    assert state["time_mlp.0.weight"].shape[1] == cfg.base_channels  # the timestep's sinusoid
    shrunk = [name for name, tensor in state.items() if tensor.shape != original[name].shape]
    assert "up.0.blocks.0.conv1.weight" in shrunk  # the decoder's blocks: 64 -> 32 inner channels
    assert "stem.weight" in shrunk  # the first level's 32 channels too, one per GroupNorm group
    for name, tensor in state.items():
        if name.endswith("bias"):  # each layer kept some of its own channels, in order, with their trained values
            assert is_subsequence(tensor, original[name]), name
    for layer in pruned.modules():
        if isinstance(layer, unet.GroupNorm):
            width = layer.weight.numel()  # widths stay multiples of 8, each with the groups GroupNorm gives it
            assert width % 8 == 0 and layer.num_groups == unet.GroupNorm.groups_for(width) >= 8
        if isinstance(layer, unet.SelfAttention):
            assert layer.q.out_features % layer.num_heads == 0
    if num_classes:
        assert state["label_embed.weight"].shape[1] < original["label_embed.weight"].shape[1]
    rebuilt = unet.create_model(cfg, state)  # from the state dict alone
    rebuilt.load_state_dict(state)
    torch.testing.assert_close(outputs(rebuilt.eval(), cfg, y), outputs(pruned, cfg, y), rtol=0, atol=0)


def test_each_layer_keeps_the_share_of_its_channels_the_ratio_asks_for_to_the_nearest_multiple_of_8():
    assert [pruning.kept_width(32, r) for r in (0, 0.2, 0.3, 0.5, 0.9)] == [32, 24, 24, 16, 8]
    assert pruning.kept_width(128, 0.3) == 88 and pruning.kept_width(64, 0.3, multiple=8) == 48
    loaded = inference.load_model("tiny")
    before = {name: tensor.shape[0] for name, tensor in loaded.model.state_dict().items()}
    batches = [(torch.rand(4, 3, 16, 16) * 2 - 1, None)]
    pruned = pruning.prune_unet(loaded.model, create_diffusion(loaded.cfg), batches, 0.3, loaded.cfg)
    # The library alone would keep int(32 x 0.7) = 22 rounded down to 16, and per attention head, 8 of 64.
    assert pruned.stem.weight.shape[0] == 24 and pruned.down[1].blocks[0].conv1.weight.shape[0] == 48
    for name, layer in pruned.named_modules():
        if isinstance(layer, unet.SelfAttention):
            multiple = math.lcm(8, layer.num_heads)
            assert layer.q.out_features == pruning.kept_width(before[f"{name}.q.weight"], 0.3, multiple), name


@pytest.mark.parametrize("dead", [0, 1])
def test_the_channels_that_do_not_change_the_loss_go_first(dead):
    # down.1.blocks.0's inner channels (conv1 -> norm2 -> conv2): 64, of which pruning half removes 32. Where conv2
    # ignores every other channel, from place `dead`, their Taylor scores are 0 but for what they add to their
    # GroupNorm partners' statistics: those 32 must go, whichever half it is.
    loaded = inference.load_model("tiny")
    block = loaded.model.down[1].blocks[0]
    with torch.no_grad():
        block.conv2.weight[:, dead::2] = 0
    original_bias = block.conv1.bias.detach().clone()
    batches = [(torch.rand(4, 3, 16, 16) * 2 - 1, None)]
    pruned = pruning.prune_unet(loaded.model, create_diffusion(loaded.cfg), batches, 0.5, loaded.cfg)
    assert torch.equal(pruned.down[1].blocks[0].conv1.bias, original_bias[1 - dead::2])


def test_a_pruned_checkpoint_loads_without_the_library_and_predicts_what_the_pruned_model_does(monkeypatch):
    path, state = prune("--ratio", "0.5")
    assert path.name == "pruned.pt" and path.parent.name == "tiny-prune0.5"
    assert state["pruning"]["ratio"] == 0.5 and state["pruning"]["flops"][1] < state["pruning"]["flops"][0]
    assert state["config"]["run_name"] == "tiny-prune0.5"
    loaded = inference.load_model("tiny")
    batches = compress.importance_batches(loaded.cfg, compress.CompressOptions(importance_batches=1, batch_size=4))
    in_memory = pruning.prune_unet(loaded.model, create_diffusion(loaded.cfg), batches, 0.5, loaded.cfg)
    monkeypatch.setitem(sys.modules, "torch_pruning", None)  # import torch_pruning now fails
    reloaded = inference.load_model(checkpoint=str(path)).model
    torch.testing.assert_close(outputs(reloaded, loaded.cfg), outputs(in_memory, loaded.cfg), rtol=0, atol=0)
    with pytest.raises(utils.UsageError, match="pip install torch-pruning"):
        pruning.prune_unet(reloaded, create_diffusion(loaded.cfg), batches, 0.5, loaded.cfg)


def test_ratio_zero_leaves_the_model_as_it_was():
    _, state = prune("--ratio", "0")
    original = inference.load_model("tiny").model.state_dict()
    for name, tensor in original.items():
        assert torch.equal(state["ema"][name], tensor), name


def test_fit_layers_refuses_weights_of_another_model_in_one_sentence():
    _, state = prune("--ratio", "0.5")
    state["ema"]["up.0.blocks.0.norm2.weight"] = torch.ones(20)  # 20 weights beside 32 biases
    utils.save_checkpoint(state, utils.CHECKPOINT_DIR / "broken" / "last.pt")
    with pytest.raises(utils.CheckpointError, match="do not fit the model its config describes"):
        inference.load_model("broken")


def test_fine_tuning_starts_as_the_pruned_model_and_resumes_bit_for_bit():
    path, pruned = prune("--ratio", "0.5")
    flags = ["--init-from", str(path), *TRAIN_FLAGS]
    train.main([*flags, "--run-name", "first", "--max-steps", "1", "--lr", "1e-30"])
    start = utils.load_checkpoint("checkpoints/first/last.pt")
    for name, tensor in pruned["ema"].items():
        torch.testing.assert_close(start["model"][name], tensor)
        torch.testing.assert_close(start["ema"][name], tensor)  # the average starts there too
    # The source run's settings, the fine-tuning's own name and length.
    assert start["config"]["channel_mults"] == [1, 2] and start["config"]["timesteps"] == 20
    assert start["config"]["run_name"] == "first" and start["config"]["init_from"] == str(path)

    train.main([*flags, "--run-name", "straight", "--max-steps", "4"])
    train.main([*flags, "--run-name", "stopped", "--max-steps", "2"])
    train.main([*flags, "--run-name", "stopped", "--max-steps", "4"])
    straight = utils.load_checkpoint("checkpoints/straight/last.pt")
    resumed = utils.load_checkpoint("checkpoints/stopped/last.pt")
    assert straight["step"] == resumed["step"] == 4
    for name, tensor in straight["model"].items():
        assert torch.equal(tensor, resumed["model"][name]), name
    assert any(not torch.equal(tensor, pruned["ema"][name]) for name, tensor in straight["model"].items())
    assert outputs(inference.load_model("straight").model, inference.load_model("tiny").cfg).shape == (3, 3, 16, 16)


def test_prune_fine_tunes_for_a_tenth_of_the_steps_and_reuses_its_work_when_run_again(capsys):
    flags = PRUNE[:-2]  # the default fine-tuning
    path = compress.run(*compress.parse_options(["prune", "--run-name", "tiny", "--ratio", "0.5", *flags]))
    assert path == utils.CHECKPOINT_DIR / "tiny-prune0.5" / "last.pt"
    fine_tuned = utils.load_checkpoint(path)
    assert fine_tuned["step"] == 4  # 10% of the 40 steps the tiny run was trained
    original = inference.load_model("tiny")
    assert fine_tuned["config"]["lr"] == pytest.approx(3 * original.cfg.lr)  # 3 times the original's, by default
    assert fine_tuned["config"]["warmup_steps"] == 1
    assert fine_tuned["config"]["norm_groups"] == "divisor"
    # It learnt the original's outputs, from a copy of its weights beside pruned.pt.
    teacher = path.parent / "original.pt"
    assert fine_tuned["config"]["distill_from"] == str(teacher)
    for name, tensor in original.model.state_dict().items():
        assert torch.equal(utils.load_checkpoint(teacher)["ema"][name], tensor), name
    # A run started from the fine-tuned model learns from the data unless told: its teacher is not inherited.
    train.main(["--init-from", str(path), "--run-name", "more", "--max-steps", "1", *TRAIN_FLAGS])
    assert utils.load_checkpoint("checkpoints/more/last.pt")["config"]["distill_from"] == ""
    with pytest.raises(utils.UsageError, match="started with --finetune-loss distill, which it keeps"):
        compress.run(*compress.parse_options(["prune", "--run-name", "tiny", "--ratio", "0.5", *flags,
                                              "--finetune-steps", "6", "--finetune-loss", "data"]))
    capsys.readouterr()
    compress.run(*compress.parse_options(["prune", "--run-name", "tiny", "--ratio", "0.5", *flags]))
    out = capsys.readouterr().out
    assert "pruned before with these settings, reused" in out and "fine-tuning" not in out
    with pytest.raises(utils.UsageError, match="pruned with other settings"):
        compress.run(*compress.parse_options(["prune", "--run-name", "tiny", "--ratio", "0.5", *flags,
                                              "--importance-batches", "2", "--output", "tiny-prune0.5"]))


@pytest.mark.parametrize("flags,message", [
    (["--init-from", "checkpoints/tiny/last.pt"], "needs its own --run-name"),
    (["--init-from", "checkpoints/tiny/last.pt", "--run-name", "x", "--teacher", "checkpoints/tiny/last.pt",
      "--student-steps", "2"], "not both"),
    (["--init-from", "checkpoints/tiny/last.pt", "--run-name", "x", "--base-channels", "64"],
     "would change the model"),
    (["--init-from", "checkpoints/tiny-bf16/last.pt", "--run-name", "x"], "is compressed"),
    (["--init-from", "checkpoints/tiny/last.pt", "--run-name", "tiny"], "did not start from"),
    (["--init-from", "checkpoints/student/last.pt", "--run-name", "x"], "is a distilled student"),
])
def test_init_from_refuses_what_cannot_work_in_one_sentence(flags, message, capsys):
    compress.run(*compress.parse_options(["quantize", "--run-name", "tiny", "--mode", "bf16", "--compare-images",
                                          "0"]))
    tiny_checkpoint("student", 0, seed=2, teacher="checkpoints/tiny/last.pt", student_steps=2)
    capsys.readouterr()
    with pytest.raises(SystemExit) as exit:
        train.main([*flags, *TRAIN_FLAGS, "--max-steps", "1"])
    assert exit.value.code != 0
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err


def test_fine_tune_config_takes_the_source_settings_and_the_flags_given():
    source = config.get_config("demo", lr=3e-3, ema_decay=0.99, time_budget="5m", run_name="src")
    cfg = config.get_config("cifar10", init_from="x.pt", run_name="ft", max_steps=10)
    tuned = training.fine_tune_config(cfg, source, {"init_from": "x.pt", "run_name": "ft", "max_steps": 10})
    assert tuned.lr == 3e-3 and tuned.ema_decay == 0.99 and tuned.dataset == "shapes" and tuned.preset == "demo"
    assert tuned.max_steps == 10 and tuned.time_budget == "" and tuned.run_name == "ft"
    # An EMA decay given alone turns the source's power-function EMA off.
    source = config.get_config("demo", run_name="src")
    decay = config.get_config("cifar10", init_from="x.pt", run_name="ft", ema_decay=0.9)
    flags = config.implied_overrides({"ema_decay": 0.9})  # what train.py passes for --ema-decay 0.9
    assert training.fine_tune_config(decay, source, flags).ema_gamma == 0 and source.ema_gamma == 7
    # A flag that names the source's own architecture is no change (argparse gives a list, the config a tuple).
    same = config.get_config("cifar10", init_from="x.pt", run_name="ft", channel_mults=(1, 2),
                             attn_resolutions=(16,))
    assert training.fine_tune_config(same, source, {"channel_mults": [1, 2]}).channel_mults == (1, 2)
    other = config.get_config("cifar10", init_from="x.pt", run_name="ft", channel_mults=(1, 2, 2, 2))
    with pytest.raises(config.ConfigError, match=r"--channel-mults \(1, 2, 2, 2\) would change the model"):
        training.fine_tune_config(other, source, {"channel_mults": [1, 2, 2, 2]})


def test_prune_refuses_a_student_a_step_count_it_cannot_know_and_a_stranger_pruned_pt(capsys):
    tiny_checkpoint("student", 0, seed=2, teacher="checkpoints/tiny/last.pt", student_steps=2)
    with pytest.raises(utils.UsageError, match="is a distilled student"):
        compress.run(*compress.parse_options(["prune", "--run-name", "student", *PRUNE]))
    tiny_checkpoint("fresh", 0, seed=3, step=0)
    with pytest.raises(utils.UsageError, match="give --finetune-steps N"):
        compress.run(*compress.parse_options(["prune", "--run-name", "fresh", *PRUNE[:-2]]))
    stranger = utils.CHECKPOINT_DIR / "tiny-prune0.3" / "pruned.pt"
    stranger.parent.mkdir(parents=True)
    stranger.write_bytes(utils.CHECKPOINT_DIR.joinpath("tiny", "last.pt").read_bytes())
    with pytest.raises(utils.UsageError, match="was not written by compress.py prune"):
        prune()
    compress.run(*compress.parse_options(["quantize", "--run-name", "tiny", "--mode", "bf16", "--compare-images",
                                          "0"]))
    with pytest.raises(utils.UsageError, match="holds the checkpoints of another run"):
        prune("--output", "tiny-bf16")


def test_quantize_and_benchmark_take_a_pruned_model_as_it_is(capsys):
    path, state = prune("--ratio", "0.5")
    params = sum(tensor.numel() for tensor in state["ema"].values())
    int8 = compress.run(*compress.parse_options(["quantize", "--checkpoint", str(path), "--steps", "2",
                                                 "--calibration-images", "2", "--batch-size", "2",
                                                 "--compare-images", "0", "--output", "pruned-int8"]))
    pruned = inference.load_model(checkpoint=str(path))
    quantized = quantization.load_quantized(utils.load_checkpoint(int8)["ema"], pruned.cfg,
                                            utils.load_checkpoint(int8)["compression"], compile=False)
    error = (outputs(quantized, pruned.cfg) - outputs(pruned.model, pruned.cfg)).abs().mean()
    assert error < 0.1 * outputs(pruned.model, pruned.cfg).abs().mean()
    utils.save_checkpoint(state, utils.CHECKPOINT_DIR / "pruned" / "last.pt")  # a run of the pruned weights
    full = sum(p.numel() for p in unet.create_model(pruned.cfg).parameters())
    for run in ("pruned", "pruned-int8"):
        contender = benchmark.build_run(run, torch.device("cpu"), None, batch_size=2, sample_steps=1)
        assert contender.parameters == params < 0.7 * full  # the pruned model's, not the config's full width


@pytest.mark.parametrize("flags,message", [
    (["--ratio", "1"], "--ratio must be in [0, 1)"),
    (["--importance-batches", "0"], "--importance-batches must be at least 1"),
    (["--finetune-steps", "-2"], "--finetune-steps must be at least -1"),
])
def test_prune_refuses_impossible_options(flags, message):
    with pytest.raises(utils.UsageError, match=message.replace("[", r"\[").replace(")", r"\)")):
        prune(*flags)


def test_prune_can_fine_tune_on_the_data_instead():
    path, _ = prune("--ratio", "0.5", "--finetune-steps", "1", "--finetune-loss", "data", "--lr", "1e-4")
    fine_tuned = utils.load_checkpoint(path)
    assert fine_tuned["config"]["distill_from"] == "" and fine_tuned["config"]["lr"] == 1e-4
    assert not (path.parent / "original.pt").exists()


def test_a_pruned_groupnorm_keeps_its_channels_per_group_and_old_checkpoints_keep_theirs():
    # The most groups up to 32 that divide the width; gcd(width, 32) for checkpoints saved before norm_groups.
    widths = [8, 24, 32, 40, 48, 56, 64, 80, 128, 168]
    assert [unet.GroupNorm.groups_for(width) for width in widths] == [8, 24, 32, 20, 24, 28, 32, 20, 32, 28]
    assert [unet.GroupNorm.groups_for(width, "gcd") for width in widths] == [8, 8, 32, 8, 16, 8, 32, 16, 32, 8]
    path, pruned = prune("--ratio", "0.3")
    assert pruned["config"]["norm_groups"] == "divisor"
    model = inference.load_model(checkpoint=str(path)).model
    groups = {layer.num_channels: layer.num_groups for layer in model.modules() if isinstance(layer, unet.GroupNorm)}
    assert groups[24] == 24  # the tiny U-Net's 32-channel layers, one channel a group, pruned to 24
    # The same file as the first version wrote it, without the field: grouped by gcd, as it was trained.
    del pruned["config"]["norm_groups"]
    utils.save_checkpoint(pruned, "old.pt")
    model = inference.load_model(checkpoint="old.pt").model
    groups = {layer.num_channels: layer.num_groups for layer in model.modules() if isinstance(layer, unet.GroupNorm)}
    assert groups[24] == 8 and all(count == math.gcd(width, 32) for width, count in groups.items())
