"""Tests of the diffusers conversion in pretrained.py against diffusers' own UNet2DModel (a dev-only requirement)."""

import json
import sys

import pytest
import torch

from conftest import reference_library

reference_library("diffusers")
from diffusers import UNet2DModel  # noqa: E402
from diffusers.models.embeddings import get_timestep_embedding  # noqa: E402

from config import get_config  # noqa: E402
from model import TimestepEmbedding, create_model  # noqa: E402
from pretrained import (DIFFUSERS_DDPM_CIFAR10_CONFIG, PretrainedError, export_diffusers,  # noqa: E402
                        load_pretrained)

DIFFUSERS_KWARGS = {key: value for key, value in DIFFUSERS_DDPM_CIFAR10_CONFIG.items() if not key.startswith("_")}


def randomise_(model, seed):
    """Every weight random and small, the zero- and one-initialised ones too, so no part can go unchecked."""
    torch.manual_seed(seed)
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.normal_(0.0, 0.05)
    return model.eval()


@pytest.fixture(scope="module")
def inputs():
    generator = torch.Generator().manual_seed(1)
    x = torch.randn(2, 3, 32, 32, generator=generator)
    t = torch.randint(0, 1000, (2,), generator=generator)
    return x, t


@pytest.fixture(scope="module")
def reference(inputs):
    """A randomised diffusers UNet2DModel with the google/ddpm-cifar10-32 config, and its output on `inputs`."""
    unet = randomise_(UNet2DModel(**DIFFUSERS_KWARGS), seed=0)
    with torch.no_grad():
        expected = unet(*inputs).sample
    assert expected.abs().mean() > 1e-2  # large enough that a 1e-4 tolerance means something
    return unet, expected


@pytest.fixture(scope="module")
def saved_folders(reference, tmp_path_factory):
    unet = reference[0]
    folders = {"safetensors": tmp_path_factory.mktemp("safetensors"), "bin": tmp_path_factory.mktemp("bin")}
    unet.save_pretrained(folders["safetensors"])
    unet.save_pretrained(folders["bin"], safe_serialization=False)
    assert (folders["safetensors"] / "diffusion_pytorch_model.safetensors").is_file()
    assert (folders["bin"] / "diffusion_pytorch_model.bin").is_file()
    return folders


def max_difference(model, inputs, expected):
    with torch.no_grad():
        return (model(*inputs) - expected).abs().max().item()


@pytest.mark.parametrize("file_format", ["safetensors", "bin"])
def test_loaded_weights_give_diffusers_outputs(file_format, saved_folders, reference, inputs):
    model = load_pretrained(saved_folders[file_format])
    assert not model.training
    assert max_difference(model, inputs, reference[1]) < 1e-4


def test_a_pipeline_folder_loads_its_unet_subfolder(saved_folders, reference, inputs, tmp_path):
    (tmp_path / "unet").symlink_to(saved_folders["safetensors"], target_is_directory=True)
    assert max_difference(load_pretrained(tmp_path), inputs, reference[1]) < 1e-4


def test_old_diffusers_attention_names_load_too(reference, inputs, tmp_path):
    # google/ddpm-cifar10-32 was saved by an early diffusers that named the attention layers query, key, value
    # and proj_attn.
    old_names = {"to_q": "query", "to_k": "key", "to_v": "value", "to_out.0": "proj_attn"}
    weights = {}
    for name, tensor in reference[0].state_dict().items():
        for new, old in old_names.items():
            name = name.replace(f".{new}.", f".{old}.")
        weights[name] = tensor
    assert "mid_block.attentions.0.proj_attn.weight" in weights
    torch.save(weights, tmp_path / "diffusion_pytorch_model.bin")
    (tmp_path / "config.json").write_text(json.dumps(DIFFUSERS_DDPM_CIFAR10_CONFIG))
    assert max_difference(load_pretrained(tmp_path), inputs, reference[1]) < 1e-4


def test_time_embedding_is_diffusers_ddpm_embedding():
    t = torch.tensor([0, 1, 250, 999])
    expected = get_timestep_embedding(t, 128, flip_sin_to_cos=False, downscale_freq_shift=1)
    torch.testing.assert_close(TimestepEmbedding(128)(t), expected, atol=1e-6, rtol=0)


def test_export_round_trips_through_diffusers(inputs, tmp_path):
    ours = randomise_(create_model(get_config("ddpm-cifar10")), seed=2)
    ours = ours.to(memory_format=torch.channels_last)  # how train.py may hold it
    with torch.no_grad():
        expected = ours(*inputs)
    folder = export_diffusers(ours, tmp_path / "export")

    assert json.loads((folder / "config.json").read_text())["_class_name"] == "UNet2DModel"
    unet = UNet2DModel.from_pretrained(folder).eval()
    with torch.no_grad():
        assert (unet(*inputs).sample - expected).abs().max().item() < 1e-4
    assert max_difference(load_pretrained(folder), inputs, expected) < 1e-4


def test_other_architectures_are_refused_with_one_sentence(tmp_path):
    config = dict(DIFFUSERS_DDPM_CIFAR10_CONFIG, block_out_channels=[64, 128, 128, 128])
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(PretrainedError, match="block_out_channels") as error:
        load_pretrained(tmp_path)
    assert "\n" not in str(error.value)

    # A key left out means diffusers' default, which for freq_shift is 0, not DDPM's 1.
    config = {key: value for key, value in DIFFUSERS_DDPM_CIFAR10_CONFIG.items() if key != "freq_shift"}
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(PretrainedError, match="freq_shift"):
        load_pretrained(tmp_path)

    with pytest.raises(PretrainedError, match="ddpm-cifar10"):
        export_diffusers(create_model(get_config("demo")), tmp_path / "export")


def test_a_folder_without_weights_is_refused(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps(DIFFUSERS_DDPM_CIFAR10_CONFIG))
    with pytest.raises(PretrainedError, match="diffusion_pytorch_model"):
        load_pretrained(tmp_path)


def test_hub_id_without_network_says_how_to_get_the_folder(monkeypatch, tmp_path):
    huggingface_hub = reference_library("huggingface_hub")

    def no_network(*args, **kwargs):
        raise ConnectionError("no network in this test")

    monkeypatch.chdir(tmp_path)  # so that no local folder is named like the hub id
    monkeypatch.setattr(huggingface_hub, "snapshot_download", no_network)
    with pytest.raises(PretrainedError, match="hf download google/ddpm-cifar10-32") as error:
        load_pretrained("google/ddpm-cifar10-32")
    assert "\n" not in str(error.value)


def test_hub_id_without_huggingface_hub_says_how_to_get_the_folder(monkeypatch, tmp_path):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setitem(sys.modules, "huggingface_hub", None)  # makes `import huggingface_hub` fail
    with pytest.raises(PretrainedError, match="pip install huggingface_hub"):
        load_pretrained("google/ddpm-cifar10-32")
