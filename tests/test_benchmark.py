"""Tests of benchmark.py's FLOP count against counts by hand. Speed is the script's business, never a test's."""

import torch
from torch import nn

import benchmark
from config import get_config
from model import SelfAttention, create_model

torch.set_num_threads(2)


def test_a_convolution_counts_two_flops_per_multiply_add():
    conv = nn.Conv2d(3, 8, 3, padding=1)
    # Each of the 2 x 8 x 5 x 5 outputs sums 3 x 3 x 3 products; the bias additions are not counted.
    assert benchmark.count_flops(conv, torch.randn(2, 3, 5, 5)) == 2 * (2 * 8 * 5 * 5) * (3 * 3 * 3)


def test_attention_counts_its_four_projections_and_both_matmuls():
    batch, channels, size = 2, 64, 8
    tokens = size * size
    projections = 4 * 2 * batch * tokens * channels * channels  # q, k, v and the output projection
    matmuls = 2 * 2 * batch * tokens * tokens * channels  # q k^T and softmax(.) v, all heads together
    attention = SelfAttention(channels, num_heads=4)
    assert benchmark.count_flops(attention, torch.randn(batch, channels, size, size)) == projections + matmuls


def test_ddpm_cifar10_forward_is_design_md_12_1_gflop_plus_attention_matmuls():
    """DESIGN.md's 'about 12.1 GFLOP per 32x32 image' counts convolutions and linear layers; the attention matmuls
    add 2 x 2 x tokens^2 x channels each: five layers at 16x16 and the middle one at 4x4, all 256 channels wide."""
    with torch.device("meta"):  # shapes are all a count needs: no memory, no arithmetic
        model = create_model(get_config("ddpm-cifar10"))
        flops = benchmark.count_flops(model, torch.randn(1, 3, 32, 32), torch.zeros(1, dtype=torch.long))
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
