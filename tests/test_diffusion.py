"""Tests for diffusion.py: schedules, the forward process, the loss, and every sampler on Gaussian data.

For data x0 ~ N(mu, s^2) the ideal predictor is known in closed form (gaussian.py; DESIGN.md section 1), so each
sampler can be checked without a trained network: its samples must have mean mu and std s, and the deterministic
samplers must land on the exact end point of the probability-flow ODE. Where it is cheap, results are compared with diffusers.
"""

import math

import numpy as np
import pytest
import torch

from config import get_config
from conftest import reference_library
import gaussian
import samplers
from diffusion import GaussianDiffusion, create_diffusion, dynamic_thresholding, make_beta_schedule
from gaussian import MU, S, exact_ode_endpoint, gaussian_model

T = 1000
N = 8192  # scalar samples per sampler run


def alpha_bars(schedule):
    return gaussian.alpha_bars(schedule, T)


def make_diffusion(schedule="linear", objective="eps", **kwargs):
    return GaussianDiffusion(make_beta_schedule(schedule, T), objective=objective, **kwargs)


def starting_noise(seed=0, n=N):
    return torch.randn(n, 1, 1, 1, generator=torch.Generator().manual_seed(seed))


def identity_hook(i, x_t, x0_pred, x_prev):
    return x_prev


# --- schedules --------------------------------------------------------------------------------------------------

def test_linear_schedule_endpoints_and_scaling():
    betas = make_beta_schedule("linear", 1000)
    assert betas.dtype == torch.float64 and betas.shape == (1000,)
    assert betas[0].item() == pytest.approx(1e-4, rel=1e-12) and betas[-1].item() == pytest.approx(0.02, rel=1e-12)
    assert torch.allclose(betas.diff(), torch.full((999,), (0.02 - 1e-4) / 999, dtype=torch.float64))
    # Improved DDPM: both ends scaled by 1000 / T
    short = make_beta_schedule("linear", 250)
    assert short[0].item() == pytest.approx(4e-4) and short[-1].item() == pytest.approx(0.08)
    assert make_beta_schedule("linear", 10).max().item() == 0.999  # 20 / T would exceed 1


def test_cosine_schedule_matches_closed_form():
    betas = make_beta_schedule("cosine", T)
    alpha_bar = torch.cumprod(1 - betas, dim=0)
    # table index t is the paper's step t + 1: alpha_bar(t + 1) = f(t + 1) / f(0)
    def f(step):
        return math.cos((step / T + 0.008) / 1.008 * math.pi / 2) ** 2
    closed_form = torch.tensor([f(t + 1) / f(0) for t in range(T)], dtype=torch.float64)
    assert torch.allclose(alpha_bar[:-1], closed_form[:-1], rtol=1e-10, atol=0)
    assert betas.max().item() == 0.999 and betas[-1].item() == 0.999  # f(T) = 0 would make beta_T = 1
    assert (betas.diff() > 0).all()  # noise added per step grows with t (the first design sketch had it shrink)


def test_schedules_match_diffusers():
    schedulers = reference_library("diffusers.schedulers")
    for ours, theirs in (("linear", "linear"), ("cosine", "squaredcos_cap_v2")):
        reference = schedulers.DDPMScheduler(num_train_timesteps=T, beta_schedule=theirs).betas
        assert torch.allclose(make_beta_schedule(ours, T).float(), reference, rtol=1e-5, atol=1e-7)


def test_unknown_schedule_is_a_clear_error():
    with pytest.raises(ValueError, match="beta schedule must be one of linear, cosine"):
        make_beta_schedule("sigmoid", T)


# --- forward process and posterior -----------------------------------------------------------------------------

def test_q_sample_moments_match_eq4():
    diffusion = make_diffusion()
    alpha_bar = alpha_bars("linear")
    t = torch.tensor([0, 100, 500, 999])
    draws = 200_000
    x0 = torch.full((len(t), draws), 0.7)
    torch.manual_seed(0)
    x_t = diffusion.q_sample(x0, t, torch.randn_like(x0)).double()
    expected_mean = alpha_bar[t].sqrt() * 0.7
    expected_variance = 1 - alpha_bar[t]
    assert ((x_t.mean(1) - expected_mean).abs() < 5 * (expected_variance / draws).sqrt()).all()
    assert ((x_t.var(1) / expected_variance - 1).abs() < 5 * math.sqrt(2 / draws)).all()


@pytest.mark.parametrize("schedule", ["linear", "cosine"])
def test_q_posterior_matches_bayes_rule(schedule):
    """q(x_{t-1} | x_t, x0) is proportional to q(x_t | x_{t-1}) q(x_{t-1} | x0); integrate it on a fine grid."""
    diffusion = make_diffusion(schedule)
    betas = make_beta_schedule(schedule, T)
    alpha_bar = alpha_bars(schedule)
    for t, x0, x_t in ((1, 0.5, 0.4), (10, -0.8, -0.2), (500, 0.3, 1.7), (998, -1.0, 0.6)):
        prior_mean = alpha_bar[t - 1].sqrt() * x0  # q(x_{t-1} | x0), Eq. 4
        prior_std = (1 - alpha_bar[t - 1]).sqrt()
        likelihood_peak = x_t / (1 - betas[t]).sqrt()  # where q(x_t | x_{t-1}) peaks as a function of x_{t-1}
        # the posterior lies between the two peaks; cover both generously
        low = min(prior_mean, likelihood_peak) - 12 * prior_std
        high = max(prior_mean, likelihood_peak) + 12 * prior_std
        grid = torch.linspace(low, high, 2_000_001, dtype=torch.float64)
        log_density = (-(x_t - (1 - betas[t]).sqrt() * grid) ** 2 / (2 * betas[t])  # q(x_t | x_{t-1}), Eq. 2
                       - (grid - prior_mean) ** 2 / (2 * prior_std ** 2))
        weights = torch.softmax(log_density, dim=0)
        mean = (weights * grid).sum()
        variance = (weights * (grid - mean) ** 2).sum()

        index = torch.tensor([t])
        ours_mean, ours_variance, ours_log_variance = diffusion.q_posterior(
            torch.full((1, 1), x0), torch.full((1, 1), x_t), index)
        assert ours_mean.item() == pytest.approx(mean.item(), rel=1e-5, abs=1e-6)
        assert ours_variance.item() == pytest.approx(variance.item(), rel=1e-4)
        assert ours_log_variance.item() == pytest.approx(math.log(variance.item()), abs=1e-4)
    # at t = 0 the previous state is x0 itself
    mean, variance, _ = diffusion.q_posterior(torch.full((1, 1), 0.5), torch.full((1, 1), 0.4), torch.tensor([0]))
    assert mean.item() == pytest.approx(0.5, abs=1e-6) and variance.item() == 0


# --- predictions and the loss ----------------------------------------------------------------------------------

def test_conversions_round_trip():
    diffusion = make_diffusion("cosine")
    torch.manual_seed(0)
    t = torch.arange(0, T, 37)
    x0 = torch.rand(len(t), 3, 4, 4) * 2 - 1
    eps = torch.randn_like(x0)
    x_t = diffusion.q_sample(x0, t, eps)
    v = diffusion.get_v(x0, t, eps)
    alpha_bar = alpha_bars("cosine")[t].view(-1, 1, 1, 1).float()
    assert torch.allclose(v, alpha_bar.sqrt() * eps - (1 - alpha_bar).sqrt() * x0, atol=1e-6)
    # away from t = T-1, where sqrt(alpha_bar) ~ 1e-3 amplifies float32 rounding in the x0 estimate
    assert torch.allclose(diffusion.predict_x0_from_eps(x_t, t, eps)[:-1], x0[:-1], atol=1e-4)
    assert torch.allclose(diffusion.predict_eps_from_x0(x_t, t, x0)[1:], eps[1:], atol=1e-4)
    assert torch.allclose(diffusion.predict_x0_from_v(x_t, t, v), x0, atol=1e-5)
    assert torch.allclose(diffusion.predict_eps_from_v(x_t, t, v), eps, atol=1e-5)


def oracle(diffusion, x0, t, noise):
    """A perfect model for a known (x0, t, noise): returns exactly the training target of the objective."""
    target = {"eps": noise, "x0": x0, "v": diffusion.get_v(x0, t, noise)}[diffusion.objective]
    return lambda x_t, t_model: target


@pytest.mark.parametrize("objective", ["eps", "x0", "v"])
@pytest.mark.parametrize("weighting", ["none", "min_snr"])
def test_oracle_loss_is_zero_and_zero_model_loss_is_weighted_mse(objective, weighting):
    diffusion = make_diffusion("linear", objective, loss_weighting=weighting)
    torch.manual_seed(0)
    x0 = torch.rand(16, 3, 8, 8) * 2 - 1
    t = torch.randint(0, T, (16,))
    noise = torch.randn_like(x0)
    assert diffusion.training_loss(oracle(diffusion, x0, t, noise), x0, t=t, noise=noise).item() < 1e-12

    # a model that predicts 0 pays the weighted mean of target^2, with DESIGN.md's Min-SNR-5 weights
    target = oracle(diffusion, x0, t, noise)(None, None)
    snr = alpha_bars("linear")[t] / (1 - alpha_bars("linear")[t])
    if weighting == "none":
        weights = torch.ones(16, dtype=torch.float64)
    else:
        weights = {"eps": snr.clamp(max=5) / snr, "v": snr.clamp(max=5) / (snr + 1), "x0": snr.clamp(max=5)}[objective]
    expected = (weights * target.double().pow(2).mean(dim=(1, 2, 3))).mean()
    loss = diffusion.training_loss(lambda x_t, t_model: torch.zeros_like(x_t), x0, t=t, noise=noise)
    assert loss.dtype == torch.float32
    assert loss.item() == pytest.approx(expected.item(), rel=1e-5)


def test_min_snr_weight_tables_match_design():
    snr = alpha_bars("cosine") / (1 - alpha_bars("cosine"))
    expected = {"eps": snr.clamp(max=5) / snr, "v": snr.clamp(max=5) / (snr + 1), "x0": snr.clamp(max=5)}
    for objective, weights in expected.items():
        table = make_diffusion("cosine", objective, loss_weighting="min_snr").loss_weights
        assert torch.allclose(table.double(), weights, rtol=1e-5)
    assert (make_diffusion("cosine", "v").loss_weights == 1).all()


def test_loss_is_float32_for_a_half_precision_model_and_sees_t_and_x_t():
    diffusion = make_diffusion()
    torch.manual_seed(0)
    x0 = torch.rand(4, 3, 8, 8) * 2 - 1
    t = torch.tensor([0, 10, 500, 999])
    noise = torch.randn_like(x0)
    seen = {}

    def model(x_t, t_model):
        seen.update(x_t=x_t, t=t_model)
        return noise.bfloat16()

    loss = diffusion.training_loss(model, x0, t=t, noise=noise)
    assert loss.dtype == torch.float32 and loss.item() < 1e-4  # only bf16 rounding of the perfect answer remains
    assert torch.equal(seen["t"], t) and torch.allclose(seen["x_t"], diffusion.q_sample(x0, t, noise))


def test_labels_are_dropped_to_the_null_label_at_the_given_rate():
    seen = []

    def model(x_t, t, labels):
        seen.append(labels)
        return torch.zeros_like(x_t)

    torch.manual_seed(0)
    y = torch.randint(0, 10, (20_000,))
    make_diffusion(num_classes=10, cond_drop_prob=0.25).training_loss(model, torch.zeros(20_000, 1, 1, 1), y)
    dropped = seen[0] == 10  # the null label is num_classes
    assert abs(dropped.float().mean().item() - 0.25) < 0.015  # 5 standard errors
    assert torch.equal(seen[0][~dropped], y[~dropped])
    make_diffusion(num_classes=10, cond_drop_prob=0.0).training_loss(model, torch.zeros(100, 1, 1, 1), y[:100])
    assert torch.equal(seen[1], y[:100])


# --- every sampler on Gaussian data ----------------------------------------------------------------------------

def exact_chain(sampler, timesteps, schedule="linear", eta=0.0, ddpm_variance="large", mu=MU, s=S):
    """The exact law of what `sampler` computes over `timesteps` with gaussian_model(mu, s), in float64.

    With that model each step is affine in the state: eps = c x_t + d, so x0_pred = p x_t + q, and every sampler's
    update is x_prev = A x_t + B + sigma z (DESIGN.md's formulas; DDPM written in its posterior-mean form
    mu_tilde(x0_pred, x_t), the sampler in diffusion.py in Alg. 2's form). So the end point is
        x_0 = k x_T + b + w^(1/2) z',   z' ~ N(0, 1) independent of x_T,
    and this returns (k, b, w). DPM-Solver++(2M) also carries the previous x0_pred, affine in x_T as well.
    """
    table = alpha_bars(schedule).tolist()
    k, b, w = 1.0, 0.0, 0.0
    k_last = b_last = h_last = None  # DPM-Solver++: the previous step's x0_pred = k_last x_T + b_last, and its h
    for i, t in enumerate(timesteps):
        alpha_bar = table[t]
        alpha_bar_prev = table[timesteps[i + 1]] if i + 1 < len(timesteps) else 1.0
        c = math.sqrt(1 - alpha_bar) / (alpha_bar * s ** 2 + 1 - alpha_bar)  # eps = c x_t + d
        d = -c * math.sqrt(alpha_bar) * mu
        p = (1 - math.sqrt(1 - alpha_bar) * c) / math.sqrt(alpha_bar)  # x0_pred = p x_t + q
        q = -math.sqrt(1 - alpha_bar) * d / math.sqrt(alpha_bar)
        last = i + 1 == len(timesteps)
        if sampler == "ddpm":  # x_prev = mu_tilde(x0_pred, x_t) + sigma z, over the respaced betas
            beta = 1 - alpha_bar / alpha_bar_prev
            coef_x0 = math.sqrt(alpha_bar_prev) * beta / (1 - alpha_bar)
            coef_xt = math.sqrt(1 - beta) * (1 - alpha_bar_prev) / (1 - alpha_bar)
            A, B = coef_x0 * p + coef_xt, coef_x0 * q
            variance = 0.0 if last else beta if ddpm_variance == "large" else (1 - alpha_bar_prev) / (1 - alpha_bar) * beta
        elif sampler == "ddim":  # DDIM Eq. 12 with sigma from Eq. 16
            variance = eta ** 2 * (1 - alpha_bar_prev) / (1 - alpha_bar) * (1 - alpha_bar / alpha_bar_prev)
            direction = math.sqrt(1 - alpha_bar_prev - variance)
            A, B = math.sqrt(alpha_bar_prev) * p + direction * c, math.sqrt(alpha_bar_prev) * q + direction * d
        else:  # DPM-Solver++(2M), deterministic: track x_t = k x_T + b and x0_pred = k_x0 x_T + b_x0
            k_x0, b_x0 = p * k, p * b + q
            if last:  # to sigma = 0: x_0 is x0_pred
                k, b = k_x0, b_x0
                continue
            h = 0.5 * math.log(alpha_bar_prev / (1 - alpha_bar_prev)) - 0.5 * math.log(alpha_bar / (1 - alpha_bar))
            if k_last is None:  # first order on the first step
                k_D, b_D = k_x0, b_x0
            else:
                half_inv_r = h / (2 * h_last)
                k_D, b_D = (1 + half_inv_r) * k_x0 - half_inv_r * k_last, (1 + half_inv_r) * b_x0 - half_inv_r * b_last
            sigma_ratio = math.sqrt((1 - alpha_bar_prev) / (1 - alpha_bar))
            data_scale = -math.sqrt(alpha_bar_prev) * math.expm1(-h)
            k, b = sigma_ratio * k + data_scale * k_D, sigma_ratio * b + data_scale * b_D
            k_last, b_last, h_last = k_x0, b_x0, h
            continue
        k, b, w = A * k, A * b + B, A * A * w + variance
    return k, b, w


# (sampler, steps, eta, ddpm_variance): full chains, and short ones where the settings differ the most
CHAIN_CASES = [
    ("ddpm", None, 0.0, "large"), ("ddpm", None, 0.0, "small"), ("ddpm", 10, 0.0, "large"), ("ddpm", 10, 0.0, "small"),
    ("ddim", None, 0.0, "auto"), ("ddim", 10, 0.0, "auto"), ("ddim", 10, 0.5, "auto"), ("ddim", 10, 1.0, "auto"),
    ("dpmpp2m", 10, 0.0, "auto"), ("dpmpp2m", 20, 0.0, "auto"),
]
CHAIN_SAMPLES = 2 ** 16


@pytest.mark.parametrize("schedule", ["linear", "cosine"])
@pytest.mark.parametrize("sampler,steps,eta,ddpm_variance", CHAIN_CASES)
def test_samplers_follow_the_exact_law_of_their_discrete_chain(schedule, sampler, steps, eta, ddpm_variance):
    """Each sampler's output given x_T, against exact_chain: deterministic samplers sample by sample, stochastic
    ones by the mean and variance of x_0 - (k x_T + b), to four standard errors (2.2% on the variance of 2^16
    samples: a 4% error in a noise scale or an eps coefficient, or an ignored eta, is far outside)."""
    diffusion = make_diffusion(schedule)
    timesteps = diffusion.sampling_timesteps(steps or T)
    k, b, w = exact_chain(sampler, timesteps, schedule, eta, ddpm_variance)
    n = CHAIN_SAMPLES if steps else CHAIN_SAMPLES // 4  # 1000-step chains with fewer samples, to stay quick
    x_T = starting_noise(n=n)
    options = {"ddpm_variance": ddpm_variance} if sampler == "ddpm" else {}
    samples = diffusion.sample(gaussian_model("eps", schedule), x_T.shape, sampler, steps, eta=eta,
                               clip_denoised=False, x_T=x_T, generator=torch.Generator().manual_seed(1), **options)
    assert samples.dtype == torch.float32 and samples.shape == x_T.shape
    residual = samples.double() - (k * x_T.double() + b)
    if w == 0:
        assert residual.abs().max() < 1e-4
    else:
        assert abs(residual.mean().item()) < 4 * math.sqrt(w / n)
        assert abs(residual.var().item() / w - 1) < 4 * math.sqrt(2 / n)
    if steps is None:  # the full chains reproduce the data itself (short ones end on a shrunk E[x0 | x_t])
        assert abs(b - MU) < 0.01 and abs(math.sqrt(k ** 2 + w) - S) < 0.01


def test_exact_chain_tells_the_settings_apart():
    """The law the test above checks differs between the settings it must tell apart (or it would prove little)."""
    timesteps = make_diffusion().sampling_timesteps(10)
    laws = {name: exact_chain(timesteps=timesteps, **args) for name, args in (
        ("large", dict(sampler="ddpm", ddpm_variance="large")), ("small", dict(sampler="ddpm", ddpm_variance="small")),
        ("eta 0", dict(sampler="ddim", eta=0.0)), ("eta 0.5", dict(sampler="ddim", eta=0.5)),
        ("eta 1", dict(sampler="ddim", eta=1.0)))}
    assert laws["large"][2] > 2 * laws["small"][2]  # w, the variance the chain adds
    # k, how much of x_T survives: a sampler that ignored eta would leave residuals of variance (k - k')^2 >> w / 100
    assert laws["eta 0"][0] > laws["eta 0.5"][0] + 0.1 > laws["eta 1"][0] + 0.2
    assert laws["eta 0"][2] == 0
    assert laws["eta 1"] == pytest.approx(laws["small"])  # DDIM at eta = 1 is DDPM with the small variance


def zero_eps_model(x_t, t):
    return torch.zeros_like(x_t)


@pytest.mark.parametrize("steps,ddpm_variance,expected", [
    (None, "auto", "large"), (None, "large", "large"), (None, "small", "small"),
    (50, "auto", "small"), (50, "large", "large"), (50, "small", "small")])
@pytest.mark.parametrize("strength", [1.0, 0.5])
def test_ddpm_variance_setting_uses_exactly_the_sigma_it_names(steps, ddpm_variance, expected, strength):
    """With eps = 0 a DDPM step is x_prev = x_t / sqrt(alpha_t) + sigma_t z, so each step's sigma_t can be read off
    the trajectory, given the sampler's one z per step from the generator. auto = large for the full chain, small
    for a respaced one; an SDEdit chain (strength 0.5) that visits every step below t0 is a full chain too."""
    diffusion = make_diffusion()
    x_T = starting_noise(n=64)
    image = {} if strength == 1 else {"init_image": torch.zeros(1, 1, 1, 1), "strength": strength}
    samples, trajectory = diffusion.sample(zero_eps_model, x_T.shape, "ddpm", steps, clip_denoised=False, x_T=x_T,
                                           generator=torch.Generator().manual_seed(3), ddpm_variance=ddpm_variance,
                                           return_trajectory=True, **image)
    assert len(trajectory) == (steps or T) * strength
    generator = torch.Generator().manual_seed(3)
    table = alpha_bars("linear")
    states = [x_t for _, x_t, _ in trajectory] + [samples]
    for i, (t, x_t, _) in enumerate(trajectory):
        alpha_bar = table[t]
        alpha_bar_prev = table[trajectory[i + 1][0]] if i + 1 < len(trajectory) else torch.tensor(1.0)
        beta = 1 - alpha_bar / alpha_bar_prev  # the respaced beta'_t (the original beta_t on the full chain)
        sigma = beta.sqrt() if expected == "large" else ((1 - alpha_bar_prev) / (1 - alpha_bar) * beta).sqrt()
        if i + 1 == len(trajectory):
            sigma = 0 * sigma  # no noise on the last step
        z = torch.randn(x_T.shape, generator=generator)
        expected_next = x_t.double() / (1 - beta).sqrt() + sigma * z.double()
        assert torch.allclose(states[i + 1].double(), expected_next, atol=1e-5, rtol=1e-5), f"step {i}, t = {t}"


# --- dynamic thresholding --------------------------------------------------------------------------------------

def test_dynamic_thresholding_is_imagens_formula():
    generator = torch.Generator().manual_seed(0)
    x0_pred = torch.randn(3, 2, 4, 4, generator=generator)
    x0_pred[0] *= 0.3   # inside [-1, 1] but for a few pixels: s = 1, static clipping
    x0_pred[1] *= 3.0   # far outside: shrunk by s
    x0_pred[2] *= 10.0
    result = dynamic_thresholding(x0_pred, 0.9)
    for image, out in zip(x0_pred.double(), result.double()):
        s = max(np.quantile(image.abs().numpy().ravel(), 0.9), 1.0)  # numpy's linear-interpolation quantile
        torch.testing.assert_close(out, image.clamp(-s, s) / s, atol=1e-6, rtol=1e-6)
    assert result.abs().max() <= 1
    assert torch.equal(result[0], x0_pred[0].clamp(-1, 1))
    assert (result[1].abs() == 1).float().mean() == pytest.approx(0.1, abs=0.04)  # only the top 10% saturate


def test_dynamic_threshold_reaches_the_samplers_and_keeps_eps_consistent():
    diffusion = make_diffusion()
    wide = gaussian_model("eps", mu=0.0, s=4.0)  # predicts x0 far outside [-1, 1]
    x_t = starting_noise(n=256).reshape(4, 1, 8, 8) * 3
    t = torch.full((4,), 100)
    eps, x0_pred = diffusion.model_predictions(wide, x_t, t, clip_denoised=True, dynamic_threshold=0.95)
    _, unclipped = diffusion.model_predictions(wide, x_t, t)
    torch.testing.assert_close(x0_pred, dynamic_thresholding(unclipped, 0.95))
    torch.testing.assert_close(diffusion.predict_x0_from_eps(x_t, t, eps), x0_pred, atol=1e-5, rtol=1e-5)
    static = diffusion.sample(wide, (4, 1, 8, 8), "ddim", 10, generator=torch.Generator().manual_seed(0))
    dynamic = diffusion.sample(wide, (4, 1, 8, 8), "ddim", 10, generator=torch.Generator().manual_seed(0),
                               dynamic_threshold=0.95)
    assert dynamic.abs().max() <= 1
    assert (static.abs() == 1).float().mean() > 2 * (dynamic.abs() == 1).float().mean()  # less saturation


@pytest.mark.parametrize("schedule", ["linear", "cosine"])
def test_deterministic_samplers_converge_to_the_exact_ode_solution(schedule):
    diffusion = make_diffusion(schedule)
    model = gaussian_model("eps", schedule)
    x_T = starting_noise()

    def rms_error(sampler, steps):
        samples, trajectory = diffusion.sample(model, x_T.shape, sampler, steps, clip_denoised=False, x_T=x_T,
                                               return_trajectory=True)
        exact = exact_ode_endpoint(x_T, trajectory[0][0], schedule)
        return (samples.double() - exact).pow(2).mean().sqrt().item()

    ddim = [rms_error("ddim", steps) for steps in (10, 20, 50)]
    dpmpp = [rms_error("dpmpp2m", steps) for steps in (10, 20, 50)]
    assert ddim[0] > ddim[1] > ddim[2] and dpmpp[0] > dpmpp[1] > dpmpp[2]
    assert dpmpp[1] < ddim[1] / 2  # second order beats first order at equal cost
    assert dpmpp[2] < 0.003 and rms_error("ddim", T) < 0.003


def test_all_objectives_give_the_same_samples():
    x_T = starting_noise(n=512)
    results = [make_diffusion("cosine", objective).sample(gaussian_model(objective, "cosine"), x_T.shape, "dpmpp2m",
                                                          20, clip_denoised=False, x_T=x_T)
               for objective in ("eps", "x0", "v")]
    assert torch.allclose(results[0], results[1], atol=1e-4) and torch.allclose(results[0], results[2], atol=1e-4)


def test_ddim_with_eta_1_is_ddpm_with_the_posterior_variance():
    """DDIM's sigma at eta = 1 is sqrt(beta_tilde), so it takes the same steps as ancestral sampling with fixed-small
    variance (Song et al. 2021, Sec. 4.1), noise draw for noise draw."""
    diffusion = make_diffusion("cosine")
    x_T = starting_noise(n=512)
    ddim = diffusion.sample(gaussian_model("eps", "cosine"), x_T.shape, "ddim", 50, eta=1.0, x_T=x_T,
                            generator=torch.Generator().manual_seed(1))
    ddpm = diffusion.sample(gaussian_model("eps", "cosine"), x_T.shape, "ddpm", 50, ddpm_variance="small",
                            x_T=x_T, generator=torch.Generator().manual_seed(1))
    assert torch.allclose(ddim, ddpm, atol=1e-5)


def test_ddim_with_eta_0_is_deterministic():
    diffusion = make_diffusion()
    x_T = starting_noise(n=256)
    first = diffusion.sample(gaussian_model("eps"), x_T.shape, "ddim", 20, x_T=x_T,
                             generator=torch.Generator().manual_seed(1))
    second = diffusion.sample(gaussian_model("eps"), x_T.shape, "ddim", 20, x_T=x_T,
                              generator=torch.Generator().manual_seed(2))
    assert torch.equal(first, second)


@pytest.mark.parametrize("sampler,steps,eta", [("ddpm", 50, 0.0), ("ddim", 20, 0.5), ("dpmpp2m", 20, 0.0)])
def test_samplers_reproduce_with_a_seeded_generator(sampler, steps, eta):
    diffusion = make_diffusion()

    def run(seed):
        return diffusion.sample(gaussian_model("eps"), (64, 1, 4, 4), sampler, steps, eta=eta,
                                generator=torch.Generator().manual_seed(seed))

    assert torch.equal(run(0), run(0))
    assert not torch.allclose(run(0), run(1))


# --- classifier-free guidance ----------------------------------------------------------------------------------

def toy_conditional_model(x_t, t, y):
    """An output that depends on the label (null label = 10 included), x_t and t."""
    return 0.1 * x_t + 0.01 * (y.float() + 1).view(-1, 1, 1, 1) + t.float().view(-1, 1, 1, 1) / T


@pytest.mark.parametrize("objective", ["eps", "v"])
def test_guidance_scale_1_is_conditional_and_0_is_unconditional(objective):
    diffusion = make_diffusion("linear", objective, num_classes=10)
    torch.manual_seed(0)
    x_t = torch.randn(6, 3, 4, 4)
    t = torch.tensor([0, 5, 100, 400, 800, 999])
    y = torch.tensor([0, 1, 2, 3, 4, 9])
    conditional = diffusion.model_predictions(toy_conditional_model, x_t, t, y)
    unconditional = diffusion.model_predictions(toy_conditional_model, x_t, t, torch.full_like(y, 10))
    for guided, expected in ((diffusion.model_predictions(toy_conditional_model, x_t, t, y, 1.0), conditional),
                             (diffusion.model_predictions(toy_conditional_model, x_t, t, y, 0.0), unconditional)):
        assert torch.allclose(guided[0], expected[0], atol=1e-6) and torch.allclose(guided[1], expected[1], atol=1e-5)
    # w = 3 guides eps (also when the model predicts v): eps = eps_uncond + w (eps_cond - eps_uncond)
    eps, _ = diffusion.model_predictions(toy_conditional_model, x_t, t, y, 3.0)
    assert torch.allclose(eps, unconditional[0] + 3 * (conditional[0] - unconditional[0]), atol=1e-5)


def test_guided_sampling_calls_the_model_once_per_step_with_a_doubled_batch():
    diffusion = make_diffusion(num_classes=10)
    calls = []

    def model(x_t, t, y):
        calls.append((x_t.shape[0], t.clone(), y.clone()))
        return toy_conditional_model(x_t, t, y)

    y = torch.tensor([3, 7])
    diffusion.sample(model, (2, 1, 4, 4), "ddim", 5, y=y, guidance_scale=4.0)
    assert len(calls) == 5
    for batch_size, t, labels in calls:
        assert batch_size == 4 and torch.equal(labels, torch.tensor([3, 7, 10, 10])) and len(set(t.tolist())) == 1


def test_guidance_scale_0_calls_the_model_once_on_the_null_labels_alone():
    diffusion = make_diffusion(num_classes=10)
    calls = []

    def model(x_t, t, y):
        calls.append((x_t.shape[0], y.clone()))
        return toy_conditional_model(x_t, t, y)

    x_T = starting_noise(n=32).reshape(2, 1, 4, 4)
    y = torch.tensor([3, 7])
    guided = diffusion.sample(model, x_T.shape, "ddim", 5, y=y, guidance_scale=0.0, x_T=x_T)
    assert len(calls) == 5 and all(size == 2 and torch.equal(labels, torch.tensor([10, 10])) for size, labels in calls)
    unconditional = diffusion.sample(toy_conditional_model, x_T.shape, "ddim", 5, y=torch.tensor([10, 10]), x_T=x_T)
    assert torch.equal(guided, unconditional)


# --- SDEdit, inpainting, trajectories ---------------------------------------------------------------------------

def test_sdedit_with_strength_0_returns_the_input():
    image = starting_noise(n=16, seed=4).clamp(-1, 1)
    samples = make_diffusion().sample(gaussian_model("eps"), image.shape, "ddim", 10, init_image=image, strength=0)
    assert torch.equal(samples, image)


def test_sdedit_noises_the_input_to_t0_and_spreads_the_remaining_steps_below_it():
    """strength 0.3 of T = 1000: x_t0 = sqrt(alpha_bar) x0 + sqrt(1 - alpha_bar) x_T at the paper's t0 = 300 (table
    index 299), then ceil(33 x 0.3) = 10 steps below it."""
    image = starting_noise(n=16, seed=4).clamp(-1, 1)
    x_T = starting_noise(n=16)
    _, trajectory = make_diffusion().sample(gaussian_model("eps"), x_T.shape, "ddim", 33, x_T=x_T, init_image=image,
                                            strength=0.3, return_trajectory=True)
    assert [t for t, _, _ in trajectory] == [299, 269, 239, 209, 179, 149, 119, 89, 59, 29]
    alpha_bar = alpha_bars("linear")[299]
    torch.testing.assert_close(trajectory[0][1].double(), alpha_bar.sqrt() * image.double() + (1 - alpha_bar).sqrt() * x_T.double(),
                               atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("sampler", ["ddpm", "ddim", "dpmpp2m"])
def test_inpainting_keeps_the_known_pixels_exactly(sampler):
    x_known = torch.rand(4, 3, 8, 8) * 2 - 1
    mask = torch.zeros(4, 1, 8, 8)
    mask[:, :, :, :4] = 1  # keep the left half
    samples = make_diffusion().sample(gaussian_model("eps"), x_known.shape, sampler, 20, mask=mask,
                                      init_image=x_known, generator=torch.Generator().manual_seed(0))
    assert torch.equal(samples[:, :, :, :4], x_known[:, :, :, :4])
    assert not torch.allclose(samples[:, :, :, 4:], x_known[:, :, :, 4:])


@pytest.mark.parametrize("sampler", ["ddpm", "ddim"])
def test_inpainting_renoises_the_known_pixels_to_each_steps_noise_level(sampler):
    """After the step to timestep t the known pixels are x_known noised to t by Eq. 4: sqrt(alpha_bar_t) x_known +
    sqrt(1 - alpha_bar_t) z. So, at the start of every later step, (x_t - sqrt(alpha_bar_t) x_known) /
    sqrt(1 - alpha_bar_t) over the known pixels is N(0, 1): a level off by one visited step is off by 5-40% in std."""
    x_known = torch.rand(8, 1, 32, 32, generator=torch.Generator().manual_seed(0)) * 2 - 1
    mask = torch.zeros(8, 1, 32, 32)
    mask[..., :16] = 1  # 4096 known pixels
    _, trajectory = make_diffusion().sample(gaussian_model("eps"), x_known.shape, sampler, 20, mask=mask,
                                            init_image=x_known, generator=torch.Generator().manual_seed(1),
                                            return_trajectory=True)
    table = alpha_bars("linear")
    for t, x_t, _ in trajectory[1:]:
        z = (x_t[..., :16].double() - table[t].sqrt() * x_known[..., :16]) / (1 - table[t]).sqrt()
        assert abs(z.mean().item()) < 0.07 and abs(z.std().item() - 1) < 0.05, f"t = {t}"


@pytest.mark.parametrize("sampler,eta", [("ddpm", 0.0), ("ddim", 0.0), ("ddim", 1.0), ("dpmpp2m", 0.0)])
def test_trajectory_has_one_entry_per_step_in_sampling_order(sampler, eta):
    x_T = starting_noise(n=32)
    samples, trajectory = make_diffusion().sample(gaussian_model("eps"), x_T.shape, sampler, 10, eta=eta,
                                                  clip_denoised=False, x_T=x_T, return_trajectory=True,
                                                  generator=torch.Generator().manual_seed(0))
    assert [t for t, _, _ in trajectory] == [999, 899, 799, 699, 599, 499, 399, 299, 199, 99]
    assert torch.equal(trajectory[0][1], x_T)
    assert all(x_t.device.type == "cpu" and x0_pred.shape == x_T.shape for _, x_t, x0_pred in trajectory)
    # every sampler's last step goes to alpha_bar = 1 without noise: x_0 is that step's predicted x_0
    assert torch.allclose(samples, trajectory[-1][2], atol=1e-6)


def test_quadratic_spacing_puts_more_steps_at_low_noise():
    assert make_diffusion().sampling_timesteps(5, skip_type="quadratic") == [999, 639, 359, 159, 39]
    timesteps = make_diffusion().sampling_timesteps(100, skip_type="quadratic")
    assert len(set(timesteps)) == 100 and timesteps[0] == 999 and timesteps[-1] == 0


@pytest.mark.parametrize("schedule", ["linear", "cosine"])
@pytest.mark.parametrize("spacing", ["quadratic", "logsnr", "karras"])
def test_every_spacing_visits_distinct_timesteps_from_the_top(schedule, spacing):
    diffusion = make_diffusion(schedule)
    for top in (1000, 300, 7):
        for steps in sorted({1, 2, 3, 7, 50, 300, 1000} & set(range(1, top + 1))):
            timesteps = diffusion.sampling_timesteps(steps, top, spacing)
            assert len(timesteps) == steps and timesteps[0] == top - 1 and timesteps[-1] >= 0
            assert all(a > b for a, b in zip(timesteps, timesteps[1:]))  # distinct, decreasing
            if spacing != "quadratic" and steps > 1:
                assert timesteps[-1] == 0  # logsnr and karras end on the least noisy timestep, as diffusers does


@pytest.mark.parametrize("spacing", ["logsnr", "karras"])
def test_logsnr_and_karras_spacings_land_on_their_targets(spacing):
    """Evenly spaced in lambda = log-SNR / 2 (logsnr), or in sigma^(1/7) with sigma = exp(-lambda) (karras), from
    t = T - 1 to t = 0: each visited timestep is the nearest one to its target."""
    table = alpha_bars("linear")
    lambdas = 0.5 * (table / (1 - table)).log()
    transform = (lambda lam: lam) if spacing == "logsnr" else (lambda lam: torch.exp(-lam) ** (1 / 7))
    values = transform(lambdas)  # where the targets are evenly spaced
    timesteps = make_diffusion().sampling_timesteps(10, skip_type=spacing)
    targets = torch.linspace(values[999].item(), values[0].item(), 10, dtype=torch.float64)
    for t, target in zip(timesteps, targets):
        neighbours = values[max(t - 1, 0):t + 2]
        assert (values[t] - target).abs() <= (neighbours - target).abs().min() + 1e-12


@pytest.mark.parametrize("steps", [5, 10, 20])
@pytest.mark.parametrize("spacing,option", [("logsnr", "use_lu_lambdas"), ("karras", "use_karras_sigmas")])
def test_logsnr_and_karras_spacings_match_diffusers(steps, spacing, option):
    schedulers = reference_library("diffusers.schedulers")
    scheduler = schedulers.DPMSolverMultistepScheduler(num_train_timesteps=T, beta_schedule="linear", **{option: True})
    scheduler.set_timesteps(steps)
    assert make_diffusion().sampling_timesteps(steps, skip_type=spacing) == [int(t) for t in scheduler.timesteps]


def test_spacings_change_the_ode_error_as_measured():
    """gaussian.py's table, in its robust parts: on the linear schedule, DPM-Solver++(2M) at 10-20 steps is most
    accurate with logsnr spacing and DDIM with quadratic spacing, both far better than uniform."""
    def error(sampler, steps, spacing):
        return gaussian.endpoint_error(sampler, steps, spacing, num_samples=1024)

    for steps in (10, 20):
        assert error("dpmpp2m", steps, "logsnr") < error("dpmpp2m", steps, "uniform") / 2
        assert error("ddim", steps, "quadratic") < error("ddim", steps, "uniform") * 0.7


# --- diffusers as a reference ----------------------------------------------------------------------------------

@pytest.mark.parametrize("ddpm_variance,variance_type", [("large", "fixed_large"), ("small", "fixed_small")])
@pytest.mark.parametrize("clip", [False, True])
def test_respaced_ddpm_matches_diffusers(ddpm_variance, variance_type, clip):
    schedulers = reference_library("diffusers.schedulers")
    diffusion = make_diffusion()
    model = gaussian_model("eps", mu=0.0, s=1.5)  # wide data, so clipping x0_pred matters
    x_T = starting_noise(n=512)
    samples, trajectory = diffusion.sample(model, x_T.shape, "ddpm", 50, clip_denoised=clip, x_T=x_T,
                                           generator=torch.Generator().manual_seed(1), ddpm_variance=ddpm_variance,
                                           return_trajectory=True)
    timesteps = [t for t, _, _ in trajectory]
    scheduler = schedulers.DDPMScheduler(num_train_timesteps=T, trained_betas=make_beta_schedule("linear", T).numpy(),
                                         variance_type=variance_type, clip_sample=clip)
    scheduler.set_timesteps(timesteps=timesteps)
    generator = torch.Generator().manual_seed(1)
    x = x_T
    for (t, x_t, x0_pred) in trajectory:
        assert torch.allclose(x_t, x, atol=2e-4)
        output = scheduler.step(model(x, torch.full((512,), t)), t, x, generator=generator)
        assert torch.allclose(x0_pred, output.pred_original_sample, atol=2e-4)
        x = output.prev_sample
    assert not clip or samples.abs().max() <= 1
    if ddpm_variance == "small":  # diffusers' fixed_large adds noise after the last step too; DDPM does not
        assert torch.allclose(samples, x.clamp(-1, 1) if clip else x, atol=2e-4)


@pytest.mark.parametrize("eta", [0.0, 0.5])
@pytest.mark.parametrize("objective,prediction_type", [("eps", "epsilon"), ("v", "v_prediction")])
def test_ddim_step_matches_diffusers(eta, objective, prediction_type):
    schedulers = reference_library("diffusers.schedulers")
    diffusion = make_diffusion("cosine", objective)
    model = gaussian_model(objective, "cosine", mu=0.0, s=1.5)
    scheduler = schedulers.DDIMScheduler(num_train_timesteps=T, beta_schedule="squaredcos_cap_v2", clip_sample=True,
                                         prediction_type=prediction_type)
    scheduler.set_timesteps(25)  # diffusers' own spacing: 960, 920, ..., 0
    x_T = starting_noise(n=512)
    timesteps = scheduler.timesteps.tolist()

    def predict(x_t, t):
        return diffusion.model_predictions(model, x_t, torch.full((512,), t), clip_denoised=True)

    ours = samplers.ddim_sample(diffusion, predict, x_T, timesteps, torch.Generator().manual_seed(1), identity_hook,
                                eta=eta)
    generator = torch.Generator().manual_seed(1)
    x = x_T
    for t in timesteps:
        x = scheduler.step(model(x, torch.full((512,), t)), t, x, eta=eta, use_clipped_model_output=True,
                           generator=generator).prev_sample
    assert torch.allclose(ours, x, atol=2e-4)


@pytest.mark.parametrize("steps", [10, 20])
@pytest.mark.parametrize("objective,prediction_type", [("eps", "epsilon"), ("x0", "sample"), ("v", "v_prediction")])
def test_dpmpp2m_matches_diffusers(steps, objective, prediction_type):
    schedulers = reference_library("diffusers.schedulers")
    diffusion = make_diffusion("linear", objective)
    model = gaussian_model(objective)
    x_T = starting_noise(n=512)
    samples, trajectory = diffusion.sample(model, x_T.shape, "dpmpp2m", steps, clip_denoised=False, x_T=x_T,
                                           return_trajectory=True)
    scheduler = schedulers.DPMSolverMultistepScheduler(
        num_train_timesteps=T, trained_betas=make_beta_schedule("linear", T).numpy(), algorithm_type="dpmsolver++",
        solver_order=2, prediction_type=prediction_type, final_sigmas_type="zero")
    scheduler.set_timesteps(timesteps=[t for t, _, _ in trajectory])
    x = x_T
    for t in scheduler.timesteps:
        x = scheduler.step(model(x, torch.full((512,), int(t))), t, x).prev_sample
    assert torch.allclose(samples, x, atol=1e-4)


# --- construction and errors -----------------------------------------------------------------------------------

def test_create_diffusion_reads_the_config():
    cfg = get_config("demo", timesteps=500, beta_schedule="cosine", objective="v", loss_weighting="min_snr",
                     num_classes=4, cond_drop_prob=0.2)
    diffusion = create_diffusion(cfg)
    assert diffusion.num_timesteps == 500 and diffusion.objective == "v" and diffusion.loss_weighting == "min_snr"
    assert diffusion.null_label == 4 and diffusion.cond_drop_prob == 0.2
    assert torch.allclose(diffusion.betas, make_beta_schedule("cosine", 500).float())
    assert diffusion.betas.dtype == torch.float32 and diffusion.alphas_cumprod.dtype == torch.float32


@pytest.mark.parametrize("kwargs,message", [
    (dict(sampler="euler"), "sampler must be one of ddpm, ddim, dpmpp2m"),
    (dict(steps=1001), "steps must be an integer from 1 to 1000"),
    (dict(sampler="ddim", eta=1.5), "eta must be between 0 and 1"),
    (dict(eta=0.5), "eta does not apply to the ddpm sampler"),
    (dict(sampler="ddim", ddpm_variance="small"), "ddpm_variance does not apply to the ddim sampler"),
    (dict(ddpm_variance="medium"), "ddpm_variance must be one of auto, large, small"),
    (dict(strength=0.5), "need init_image"),
    (dict(start_t=100), "start_t is no longer an argument of sample"),
    (dict(init_image=torch.zeros(1, 1, 4, 4), strength=1.5), "strength must be in"),
    (dict(skip_type="cosine"), "skip_type must be one of uniform, quadratic, logsnr, karras"),
    (dict(guidance_scale=3.0), "needs labels y"),
    (dict(y=torch.zeros(2, dtype=torch.long)), "unconditional"),
    (dict(mask=torch.ones(2, 1, 4, 4)), "need init_image"),
])
def test_bad_sampling_arguments_are_clear_errors(kwargs, message):
    with pytest.raises(ValueError, match=message):
        make_diffusion().sample(gaussian_model("eps"), (2, 1, 4, 4), **kwargs)


def test_bad_construction_arguments_are_clear_errors():
    with pytest.raises(ValueError, match="objective must be one of eps, x0, v"):
        make_diffusion(objective="score")
    with pytest.raises(ValueError, match="loss_weighting must be one of none, min_snr"):
        make_diffusion(loss_weighting="p2")
    with pytest.raises(ValueError, match="betas must be"):
        GaussianDiffusion(torch.tensor([0.1, 1.0]))
