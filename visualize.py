"""Pictures of diffusion: the reverse process as a GIF and a strip, the forward process, and the noise schedules.

Every function takes plain tensors (images in [-1, 1], shaped (B, C, H, W)) and writes one file; none of them knows
about models, checkpoints or datasets, which sample.py wires in. Imports no project module but utils.
"""

from pathlib import Path

import numpy as np
import torch

import utils

ROW_LABEL_WIDTH = 40  # pixels left of a GIF frame for the row names
TITLE_HEIGHT = 16     # pixels above it for the step


def evenly_spaced(count, most):
    """Indices of at most `most` items spread evenly over range(count), always with the first and the last."""
    if count <= most:
        return list(range(count))
    return sorted({round(i * (count - 1) / (most - 1)) for i in range(most)})


def _matplotlib():
    import matplotlib
    matplotlib.use("Agg")  # draw into files; no window, no display needed
    import matplotlib.pyplot as plt
    return plt


# --- the reverse process -----------------------------------------------------------------------------------

def _frame(top, bottom, title, scale, row_names=("x_t", "pred.\nx_0")):
    """One GIF frame (H, W, 3) uint8: `top` images above `bottom` images (each (k, C, H, W)), with a title and
    row names, every pixel shown `scale` x `scale` times so small images stay visible."""
    from PIL import Image, ImageDraw

    grid = utils.make_grid(torch.cat([top, bottom]), nrow=len(top))  # (H', W', 3): two rows of k images
    grid = grid.repeat(scale, axis=0).repeat(scale, axis=1)
    height, width = grid.shape[:2]
    canvas = Image.new("RGB", (ROW_LABEL_WIDTH + width, TITLE_HEIGHT + height), "white")
    canvas.paste(Image.fromarray(grid), (ROW_LABEL_WIDTH, TITLE_HEIGHT))
    draw = ImageDraw.Draw(canvas)
    draw.text((ROW_LABEL_WIDTH + 2, 2), title, fill="black")
    for row, name in enumerate(row_names):
        draw.multiline_text((2, TITLE_HEIGHT + (2 * row + 1) * height // 4 - 5 * (1 + name.count("\n"))), name,
                            fill="black")
    return np.asarray(canvas)


def write_gif(trajectory, final_images, path, max_frames=100, frame_ms=60, hold_ms=1500):
    """An animated GIF of the reverse process: for each step, the noisy x_t (top row) above the x_0 the model
    predicts from it (bottom row), then the finished samples, held for `hold_ms`.

    trajectory: [(t, x_t, x0_pred)] in sampling order, as GaussianDiffusion.sample returns it (x_t, x0_pred:
    (k, C, H, W)); at most `max_frames` steps are shown, evenly spread, so the file stays small.
    Returns the path; the GIF has min(len(trajectory), max_frames) + 1 frames.
    """
    import imageio.v3 as iio

    scale = max(1, 64 // final_images.shape[-1])  # show each image at least 64 pixels wide
    chosen = evenly_spaced(len(trajectory), max_frames)
    frames = []
    for number, index in enumerate(chosen):
        t, x_t, x0_pred = trajectory[index]
        frames.append(_frame(x_t, x0_pred, f"t = {t}   (frame {number + 1}/{len(chosen)})", scale))
    frames.append(_frame(final_images, final_images, "the finished samples", scale, row_names=("x_0", "x_0")))
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    iio.imwrite(path, np.stack(frames), duration=[frame_ms] * len(chosen) + [hold_ms], loop=0)
    return Path(path)


def write_strip(trajectory, path, num_steps=10):
    """A PNG of `num_steps` evenly spaced steps side by side: x_t above, the predicted x_0 below; one row per
    sample, one column per step, each column labelled with its t. Returns the path."""
    plt = _matplotlib()
    chosen = [trajectory[index] for index in evenly_spaced(len(trajectory), num_steps)]
    num_samples, _, _, width = chosen[0][1].shape
    titles = (r"$x_t$: the noisy image at step t",
              r"predicted $x_0 = (x_t - \sqrt{1 - \bar\alpha_t}\,\epsilon_\theta) / \sqrt{\bar\alpha_t}$")
    fig, axes = plt.subplots(2, 1, figsize=(1 + 0.9 * len(chosen), 1 + 1.8 * num_samples), dpi=120, squeeze=False)
    for ax, part, title in zip(axes[:, 0], (1, 2), titles):
        images = torch.stack([step[part] for step in chosen], dim=1)  # (samples, steps, C, H, W)
        ax.imshow(utils.make_grid(images.flatten(0, 1), nrow=len(chosen)))  # one row per sample
        ax.set_xticks([2 + column * (width + 2) + width / 2 for column in range(len(chosen))])
        ax.set_xticklabels([f"t={step[0]}" for step in chosen], fontsize=8)
        ax.set_yticks([])
        ax.set_title(title, fontsize=9)
    return utils.save_figure(fig, path)


# --- the forward process and the schedules ------------------------------------------------------------------

def forward_process_figure(columns, path, title):
    """A grid of real images (rows) noised by q(x_t | x_0) at growing t (columns), each column labelled with t,
    alpha_bar_t and SNR_t = alpha_bar_t / (1 - alpha_bar_t).

    columns: [(t, alpha_bar_t, x_t)], x_t (n, C, H, W) for the same n images and the same noise eps at every t;
    t is the paper's step (x_t after t noising steps; 0 = the data, alpha_bar_0 = 1).
    Returns the path.
    """
    plt = _matplotlib()
    num_images = len(columns[0][2])
    fig, axes = plt.subplots(num_images, len(columns), figsize=(1.6 * len(columns), 1.6 * num_images + 1.2),
                             dpi=120, squeeze=False)
    for column, (t, alpha_bar, x_t) in enumerate(columns):
        pictures = utils.to_uint8(x_t)  # clamped to [-1, 1] for display
        snr = alpha_bar / (1 - alpha_bar) if alpha_bar < 1 else float("inf")
        axes[0, column].set_title(f"t = {t}\n" + r"$\bar\alpha_t$" + f" = {alpha_bar:.3g}\nSNR = {snr:.3g}",
                                  fontsize=9)
        for row in range(num_images):
            axes[row, column].imshow(pictures[row])
            axes[row, column].axis("off")
    fig.suptitle(title, fontsize=10)
    return utils.save_figure(fig, path)


def schedule_figure(schedules, path, current=None):
    """Three plots against t of each beta schedule in `schedules` ({name: betas float64 [T]}): beta_t,
    alpha_bar_t = prod_{s<=t} (1 - beta_s), and log SNR_t = log(alpha_bar_t / (1 - alpha_bar_t)).
    The schedule named `current` (the model's) is marked in the legend. Returns the path."""
    plt = _matplotlib()
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.6), dpi=120)
    for name, betas in schedules.items():
        alpha_bar = torch.cumprod(1 - betas, dim=0)
        log_snr = torch.log(alpha_bar / (1 - alpha_bar))
        t = np.arange(1, len(betas) + 1)  # the paper's steps 1 ... T
        label = f"{name} (this model)" if name == current else name
        for ax, values in zip(axes, (betas, alpha_bar, log_snr)):
            ax.plot(t, values.numpy(), label=label, linewidth=2)
    for ax, name in zip(axes, (r"$\beta_t$", r"$\bar\alpha_t$ (signal kept)", r"log SNR$_t$")):
        ax.set_title(name)
        ax.set_xlabel("t")
        ax.grid(True, alpha=0.3)
        ax.legend()
    fig.suptitle(f"noise schedules over T = {len(next(iter(schedules.values())))} steps", fontsize=10)
    return utils.save_figure(fig, path)
