"""Gaussian data, for which diffusion is known in closed form: the exact model and the exact end point of sampling.

For data x0 ~ N(mu, s^2 I) the best possible network is a formula, and the probability-flow ODE that deterministic
samplers solve has a known solution. So the error a sampler makes, its discretisation error alone, can be measured
exactly: tests/test_diffusion.py checks every sampler against this, and

    python gaussian.py          # the ODE end-point error of each sampler and step spacing at 5, 10 and 20 steps

prints the table of the README (Sampling: step spacings). Imports diffusion and samplers; no script.
"""

import argparse
import math

import torch

from diffusion import SKIP_TYPES, GaussianDiffusion, make_beta_schedule

MU, S = 0.3, 0.5  # the data of the tests and of the table: x0 ~ N(MU, S^2)


def alpha_bars(schedule, timesteps=1000):
    """alpha_bar_t for t = 0 ... T-1, in float64, computed here from the betas (not from GaussianDiffusion's tables,
    so that a mistake there shows)."""
    return torch.cumprod(1 - make_beta_schedule(schedule, timesteps), dim=0)


def gaussian_model(objective, schedule="linear", mu=MU, s=S, timesteps=1000):
    """The exact predictor for x0 ~ N(mu, s^2 I): E[eps | x_t], E[x0 | x_t] or E[v | x_t], a callable model(x_t, t).

    With a = sqrt(alpha_bar_t), sigma^2 = 1 - alpha_bar_t and x_t = a x0 + sigma eps, x_t is Gaussian with variance
    a^2 s^2 + sigma^2, and the regression of eps and x0 on x_t gives
        E[eps | x_t] = sigma (x_t - a mu) / (a^2 s^2 + sigma^2),   E[x0 | x_t] = mu + a s^2 (x_t - a mu) / (...).
    """
    table = alpha_bars(schedule, timesteps)

    def model(x_t, t):
        alpha_bar = table[t.cpu()].view(-1, *[1] * (x_t.ndim - 1))
        a = alpha_bar.sqrt()
        sigma = (1 - alpha_bar).sqrt()
        x = x_t.double().cpu()
        variance = alpha_bar * s ** 2 + 1 - alpha_bar
        eps = sigma * (x - a * mu) / variance
        x0 = mu + a * s ** 2 * (x - a * mu) / variance
        prediction = {"eps": eps, "x0": x0, "v": a * eps - sigma * x0}[objective]
        return prediction.float().to(x_t.device)

    return model


def exact_ode_endpoint(x_T, t_start, schedule="linear", mu=MU, s=S, timesteps=1000):
    """Where the probability-flow ODE takes x_T (at timestep t_start) for Gaussian data: the standardised
    z = (x_t - sqrt(alpha_bar_t) mu) / sqrt(alpha_bar_t s^2 + 1 - alpha_bar_t) is constant along it, so
    x_0 = mu + s z."""
    alpha_bar = alpha_bars(schedule, timesteps)[t_start].item()
    return mu + s * (x_T.double() - math.sqrt(alpha_bar) * mu) / math.sqrt(alpha_bar * s ** 2 + 1 - alpha_bar)


def endpoint_error(sampler, steps, spacing="uniform", schedule="linear", num_samples=4096, seed=0, timesteps=1000):
    """The RMS distance between what a deterministic sampler makes from num_samples scalar x_T and the exact ODE end
    point, with the exact model: the sampler's discretisation error alone (the data's std is S = 0.5)."""
    diffusion = GaussianDiffusion(make_beta_schedule(schedule, timesteps))
    x_T = torch.randn(num_samples, 1, 1, 1, generator=torch.Generator().manual_seed(seed))
    samples = diffusion.sample(gaussian_model("eps", schedule, timesteps=timesteps), x_T.shape, sampler, steps,
                               clip_denoised=False, x_T=x_T, skip_type=spacing)
    exact = exact_ode_endpoint(x_T, timesteps - 1, schedule, timesteps=timesteps)
    return (samples.double() - exact).pow(2).mean().sqrt().item()


def main(argv=None):
    """Print the end-point error table: one row per sampler and spacing, one column per step count."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--schedule", default="linear", choices=("linear", "cosine"), help="beta schedule (linear)")
    parser.add_argument("--steps", type=int, nargs="+", default=[5, 10, 20], help="step counts (5 10 20)")
    args = parser.parse_args(argv)
    print(f"RMS error of the ODE end point, x0 ~ N({MU}, {S}^2), {args.schedule} betas, T = 1000, exact model")
    print("| sampler | spacing | " + " | ".join(f"{steps} steps" for steps in args.steps) + " |")
    print("|---|---|" + "---|" * len(args.steps))
    for sampler in ("ddim", "dpmpp2m"):
        for spacing in SKIP_TYPES:
            errors = [endpoint_error(sampler, steps, spacing, args.schedule) for steps in args.steps]
            print(f"| {sampler} | {spacing} | " + " | ".join(f"{error:.2e}" for error in errors) + " |")


if __name__ == "__main__":
    main()
