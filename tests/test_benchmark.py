"""Tests of the FLOP count benchmark.py reports (utils.count_flops) against counts by hand. Speed is the script's
business, never a test's."""

import torch
from torch import nn

import benchmark
import utils
from config import get_config
from model import SelfAttention, create_model

torch.set_num_threads(2)


def test_a_convolution_counts_two_flops_per_multiply_add():
    conv = nn.Conv2d(3, 8, 3, padding=1)
    # Each of the 2 x 8 x 5 x 5 outputs sums 3 x 3 x 3 products; the bias additions are not counted.
    assert utils.count_flops(conv, torch.randn(2, 3, 5, 5)) == 2 * (2 * 8 * 5 * 5) * (3 * 3 * 3)


def test_attention_counts_its_four_projections_and_both_matmuls():
    batch, channels, size = 2, 64, 8
    tokens = size * size
    projections = 4 * 2 * batch * tokens * channels * channels  # q, k, v and the output projection
    matmuls = 2 * 2 * batch * tokens * tokens * channels  # q k^T and softmax(.) v, all heads together
    attention = SelfAttention(channels, num_heads=4)
    assert utils.count_flops(attention, torch.randn(batch, channels, size, size)) == projections + matmuls


def test_tiny_unet_forward_counts_every_layer_by_hand():
    """The FLOPs of one forward pass of a tiny U-Net (conftest's TINY) on one 16x16 image, written out layer by
    layer from model.py's architecture, as benchmark.py counts them: 2 per multiply-add of every convolution,
    linear layer and attention matmul. Not counted: bias additions, GroupNorm, SiLU, softmax and the
    1/sqrt(head_dim) scaling, the residual additions, the nearest-neighbour upsampling, the skip concatenations,
    the sinusoidal timestep embedding and the padding. A wrong count (multiply-adds instead of FLOPs, attention's
    matmuls missed on the CPU's fused kernel, linear layers missed) or a layer the counter does not see changes
    the total.

    The model: base 32 channels, widths (32, 64) at 16x16 and 8x8, one ResBlock per encoder level (two per decoder
    level), attention at 8x8 with 2 heads, time embedding 4 x 32 = 128 wide; unconditional, 3 colour channels."""

    def conv(c_in, c_out, kernel, size):
        """Multiply-adds of a kernel x kernel convolution with a size x size output: each output sums
        c_in x kernel x kernel products."""
        return size * size * c_out * c_in * kernel * kernel

    def resblock(c_in, c_out, size, emb_dim=128):
        """conv1 (3x3), the embedding's projection (Linear emb_dim -> c_out, once per image), conv2 (3x3), and the
        1x1 conv on the skip path when the width changes."""
        skip = conv(c_in, c_out, 1, size) if c_in != c_out else 0
        return conv(c_in, c_out, 3, size) + emb_dim * c_out + conv(c_out, c_out, 3, size) + skip

    def attention(channels, size, heads):
        """q, k, v and the output projection (Linear channels -> channels per token), then per head q k^T
        (tokens x tokens x head_dim) and the weights times v (the same)."""
        tokens = size * size
        head_dim = channels // heads
        return 4 * tokens * channels * channels + 2 * heads * tokens * tokens * head_dim

    multiply_adds = {
        "time MLP": 32 * 128 + 128 * 128,  # Linear(32, 128), SiLU, Linear(128, 128)
        "stem": conv(3, 32, 3, 16),
        # encoder; the skips kept for the decoder: stem 32, block 32, downsample 32 (all 16x16 or 8x8), block 64
        "down 0 block": resblock(32, 32, 16),
        "down 0 downsample": conv(32, 32, 3, 8),  # 3x3 stride 2 on the padded 17x17 map: (17 - 3) // 2 + 1 = 8
        "down 1 block": resblock(32, 64, 8),
        "down 1 attention": attention(64, 8, heads=2),
        "middle": resblock(64, 64, 8) + attention(64, 8, heads=2) + resblock(64, 64, 8),
        # decoder: each block takes h concatenated with the last skip left
        "up 1 block 0": resblock(64 + 64, 64, 8) + attention(64, 8, heads=2),
        "up 1 block 1": resblock(64 + 32, 64, 8) + attention(64, 8, heads=2),
        "up 1 upsample": conv(64, 64, 3, 16),  # 3x3 conv after the 2x nearest-neighbour repeat
        "up 0 block 0": resblock(64 + 32, 32, 16),
        "up 0 block 1": resblock(32 + 32, 32, 16),
        "output conv": conv(32, 3, 3, 16),
    }
    # Spelled out once, so that a mistake in the helpers above cannot hide: the stem and one attention layer.
    assert multiply_adds["stem"] == 16 * 16 * 32 * 3 * 3 * 3 == 221_184
    assert multiply_adds["down 1 attention"] == 4 * 64 * 64 * 64 + 2 * 2 * 64 * 64 * 32 == 1_572_864
    expected = 2 * sum(multiply_adds.values())
    assert expected == 132_759_552

    cfg = get_config("demo", image_size=16, channels=3, num_classes=0, base_channels=32, channel_mults=(1, 2),
                     num_res_blocks=1, attn_resolutions=(8,), num_heads=2)
    # On real CPU tensors, not the meta device: there PyTorch would pick the math attention kernel anyway, so a count
    # that forgot to force it (and missed the fused CPU kernel's matmuls) would still pass.
    model = create_model(cfg).eval()
    flops = utils.count_flops(model, torch.randn(1, 3, 16, 16), torch.zeros(1, dtype=torch.long))
    assert flops == expected


def test_ddpm_cifar10_forward_is_design_md_12_1_gflop_plus_attention_matmuls():
    """DESIGN.md's 'about 12.1 GFLOP per 32x32 image' counts convolutions and linear layers; the attention matmuls
    add 2 x 2 x tokens^2 x channels each: five layers at 16x16 and the middle one at 4x4, all 256 channels wide."""
    with torch.device("meta"):  # shapes are all a count needs: no memory, no arithmetic
        model = create_model(get_config("ddpm-cifar10"))
        flops = utils.count_flops(model, torch.randn(1, 3, 32, 32), torch.zeros(1, dtype=torch.long))
    attention_matmuls = 5 * (2 * 2 * (16 * 16) ** 2 * 256) + 2 * 2 * (4 * 4) ** 2 * 256
    assert attention_matmuls == 335_806_464
    assert abs((flops - attention_matmuls) / 1e9 - 12.1) < 0.05


def test_profile_lists_the_operators_of_one_step_and_one_call(capsys):
    a = torch.randn(64, 64)
    contender = benchmark.Contender("toy", forward=None, parameters=0,
                                    train_step=lambda: [torch.mm(a, a) for _ in range(3)],
                                    sample_call=lambda: torch.sigmoid(a))
    opts = benchmark.BenchmarkOptions(iters=2, profile=1)
    benchmark.print_profile(contender, torch.device("cpu"), opts)
    out = capsys.readouterr().out
    training, sampling = out.split("one sampling call")
    rows = [line.split() for line in training.splitlines() if "aten::" in line]
    assert len(rows) == 1 and rows[0][1:] == ["3", "aten::mm"]  # --profile 1: one row; 3 calls per step
    assert "aten::sigmoid" in sampling and "aten::mm" not in sampling
