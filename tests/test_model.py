"""Tests of the U-Net in model.py: shapes, the DDPM parameter count, conditioning, gradients, formulas, layouts."""

import math

import pytest
import torch
import torch.nn.functional as F

from config import PRESETS, get_config
from conftest import randomise_zero_layers_
from model import GroupNorm, ResBlock, SelfAttention, TimestepEmbedding, create_model


def tiny_config(**overrides):
    """A 3-level U-Net at 16x16 (attention at 8x8 and in the middle) that runs in milliseconds."""
    return get_config("demo", **{"image_size": 16, "dropout": 0.0, "num_classes": 0, "channel_mults": (1, 2, 2),
                                 **overrides})


def tiny_model(seed=0, **overrides):
    """A tiny U-Net whose zero-initialised layers are randomised, so that its output depends on everything."""
    torch.manual_seed(seed)
    return randomise_zero_layers_(create_model(tiny_config(**overrides)))


def random_inputs(cfg, batch, seed=1):
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, cfg.channels, cfg.image_size, cfg.image_size, generator=generator)
    t = torch.randint(0, cfg.timesteps, (batch,), generator=generator)
    return x, t


@pytest.mark.parametrize("preset", list(PRESETS))
def test_output_has_the_input_shape_for_every_preset(preset):
    cfg = get_config(preset)
    model = create_model(cfg).eval()
    x, t = random_inputs(cfg, 2)  # one forward at batch 2: under a second even for the 58M-parameter preset
    with torch.no_grad():
        out = model(x, t)
    assert out.shape == x.shape
    assert out.dtype == x.dtype


def test_ddpm_cifar10_has_exactly_the_papers_parameter_count():
    with torch.device("meta"):  # counts shapes without allocating or initialising 35.7M numbers
        model = create_model(get_config("ddpm-cifar10"))
    assert sum(p.numel() for p in model.parameters()) == 35_746_307


def test_group_norms_are_ddpms():
    # 32 groups and eps 1e-6 as in DDPM; the comparison with diffusers is not sensitive enough to see the eps.
    modules = list(create_model(tiny_config()).modules())
    norms = [m for m in modules if isinstance(m, torch.nn.GroupNorm)]
    blocks = [m for m in modules if isinstance(m, ResBlock)]
    attentions = [m for m in modules if isinstance(m, SelfAttention)]
    assert len(norms) == 2 * len(blocks) + len(attentions) + 1  # and one before the output conv
    assert all(norm.num_groups == 32 and norm.eps == 1e-6 for norm in norms)


@pytest.mark.parametrize("size, channels_last, dtype, in_float32", [
    (8, True, torch.bfloat16, True),     # the slow kernel's case: normalised in float32, rounded back
    (8, True, torch.float16, True),
    (32, True, torch.bfloat16, False),   # 32x32 and larger: PyTorch's own kernel
    (8, False, torch.bfloat16, False),   # NCHW
    (8, True, torch.float32, False),     # already float32
])
def test_group_norm_computes_small_channels_last_inputs_in_float32(monkeypatch, size, channels_last, dtype,
                                                                  in_float32):
    norm = GroupNorm(64)
    with torch.no_grad():
        norm.weight.normal_()
        norm.bias.normal_()
    x = (torch.randn(2, 64, size, size) * 3 + 1).to(dtype)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    expected = F.group_norm(x.float(), 32, norm.weight, norm.bias, 1e-6)
    kernel_dtypes = []  # the dtype that PyTorch's kernel is given
    group_norm = F.group_norm
    monkeypatch.setattr(F, "group_norm", lambda x, *args: kernel_dtypes.append(x.dtype) or group_norm(x, *args))
    y = norm(x)
    assert kernel_dtypes == [torch.float32 if in_float32 else dtype] and y.dtype == dtype
    torch.testing.assert_close(y.float(), expected, atol=0.05, rtol=0.02)  # either way, GroupNorm


def test_output_conv_is_zero_initialised_so_the_fresh_model_predicts_zero():
    cfg = tiny_config()
    model = create_model(cfg).eval()
    assert torch.count_nonzero(model.out_conv.weight) == 0
    assert torch.count_nonzero(model.out_conv.bias) == 0
    x, t = random_inputs(cfg, 2)
    with torch.no_grad():
        assert torch.count_nonzero(model(x, t)) == 0


def test_every_residual_branch_starts_at_zero_as_in_ddpm():
    """DDPM's init: the last layer of every residual branch is zero, so each block starts as its skip path."""
    cfg = tiny_config(num_classes=4)
    torch.manual_seed(0)
    model = create_model(cfg)
    layers = [(name, m) for name, m in model.named_modules() if isinstance(m, (torch.nn.Conv2d, torch.nn.Linear))]
    zero = {f"{name}.{kind}" for name, layer in layers for kind in ("weight", "bias")
            if torch.count_nonzero(getattr(layer, kind)) == 0}  # (GroupNorm's biases start at 0 as always)
    expected = {"out_conv.weight", "out_conv.bias"}
    for name, module in model.named_modules():
        if isinstance(module, ResBlock):
            expected |= {f"{name}.conv2.weight", f"{name}.conv2.bias"}
        elif isinstance(module, SelfAttention):
            expected |= {f"{name}.proj.weight", f"{name}.proj.bias"}
    assert zero == expected  # and no other conv or linear layer: they keep PyTorch's random init
    assert len(expected) == 2 + 2 * sum(isinstance(m, (ResBlock, SelfAttention)) for m in model.modules())

    generator = torch.Generator().manual_seed(1)
    emb = torch.randn(2, 4 * cfg.base_channels, generator=generator)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, ResBlock):
                x = torch.randn(2, module.conv1.in_channels, 8, 8, generator=generator)
                assert torch.equal(module(x, emb), module.skip(x))
            elif isinstance(module, SelfAttention):
                x = torch.randn(2, module.q.in_features, 8, 8, generator=generator)
                assert torch.equal(module(x), x)


def test_conditional_model_uses_labels_and_the_null_label():
    model = tiny_model(num_classes=4).eval()
    cfg = tiny_config(num_classes=4)
    assert model.label_embed.num_embeddings == 5  # 4 classes plus the null label, index 4
    x, t = random_inputs(cfg, 2)
    with torch.no_grad():
        out_0 = model(x, t, torch.tensor([0, 0]))
        out_1 = model(x, t, torch.tensor([1, 1]))
        out_null = model(x, t, torch.tensor([4, 4]))
        out_none = model(x, t)
    assert not torch.allclose(out_0, out_1, atol=1e-4)
    assert not torch.allclose(out_0, out_null, atol=1e-4)
    assert torch.equal(out_none, out_null)  # no labels means the null label


def test_unconditional_model_refuses_labels():
    cfg = tiny_config()
    model = create_model(cfg)
    x, t = random_inputs(cfg, 2)
    with pytest.raises(ValueError, match="unconditional"):
        model(x, t, torch.tensor([0, 1]))


def test_zero_output_conv_blocks_gradients_upstream_on_the_first_step():
    # With the output conv at zero, only it learns on the first step; the rest starts learning from the second.
    cfg = tiny_config(num_classes=4)
    torch.manual_seed(0)
    model = create_model(cfg)
    x, t = random_inputs(cfg, 2)
    F.mse_loss(model(x, t, torch.tensor([0, 3])), torch.randn_like(x)).backward()
    for name, parameter in model.named_parameters():
        if name.startswith("out_conv."):
            assert parameter.grad.abs().sum() > 0, name
        else:
            assert parameter.grad is None or torch.count_nonzero(parameter.grad) == 0, name


def test_every_parameter_gets_a_gradient():
    cfg = tiny_config(num_classes=4)
    model = tiny_model(num_classes=4)  # output conv randomised, as after the first optimizer step
    x, t = random_inputs(cfg, 2)
    F.mse_loss(model(x, t, torch.tensor([0, 4])), torch.randn_like(x)).backward()
    for name, parameter in model.named_parameters():
        assert parameter.grad is not None and parameter.grad.abs().sum() > 0, name


def test_time_embedding_matches_the_closed_form_formula():
    dim = 128
    half = dim // 2
    t = torch.tensor([0, 1, 17, 500, 999])
    emb = TimestepEmbedding(dim)(t)
    assert emb.shape == (5, dim)
    for row, step in enumerate(t.tolist()):
        for i in range(half):
            angle = step * 10000 ** (-i / (half - 1))  # w_i runs from 1 to exactly 1/10000
            assert emb[row, i].item() == pytest.approx(math.sin(angle), abs=5e-4)
            assert emb[row, half + i].item() == pytest.approx(math.cos(angle), abs=5e-4)
    assert torch.equal(emb[0], torch.cat([torch.zeros(half), torch.ones(half)]))  # t = 0: sin 0, cos 0


@pytest.mark.parametrize("num_heads", [1, 4])
@pytest.mark.parametrize("channels_last", [False, True])
def test_self_attention_matches_the_explicit_formula(num_heads, channels_last):
    torch.manual_seed(0)
    attention = randomise_zero_layers_(SelfAttention(64, num_heads), std=0.1)  # proj starts at zero
    x = torch.randn(2, 64, 4, 6)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    out = attention(x)

    # softmax(q k^T / sqrt(d)) v per head, written out with a loop over heads.
    tokens = attention.norm(x).reshape(2, 64, 24).permute(0, 2, 1)  # (B, HW, C)
    q = attention.q(tokens)
    k = attention.k(tokens)
    v = attention.v(tokens)
    head_dim = 64 // num_heads
    heads = []
    for head in range(num_heads):
        part = slice(head * head_dim, (head + 1) * head_dim)
        weights = torch.softmax(q[..., part] @ k[..., part].transpose(1, 2) / math.sqrt(head_dim), dim=-1)
        heads.append(weights @ v[..., part])
    expected = x + attention.proj(torch.cat(heads, dim=-1)).permute(0, 2, 1).reshape(2, 64, 4, 6)
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-5)


def test_channels_last_gives_the_same_output_and_keeps_its_layout():
    cfg = tiny_config(num_classes=4)
    model = tiny_model(num_classes=4).eval()
    x, t = random_inputs(cfg, 2)
    y = torch.tensor([1, 2])
    with torch.no_grad():
        expected = model(x, t, y)
        model = model.to(memory_format=torch.channels_last)
        out = model(x.contiguous(memory_format=torch.channels_last), t, y)
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-4)
    assert out.is_contiguous(memory_format=torch.channels_last)  # no layout flip back to NCHW on the way
    assert expected.is_contiguous()

