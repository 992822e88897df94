"""Gaussian diffusion: noise schedules, the forward process, the training loss and three samplers.

Symbols follow the DDPM paper (Ho et al. 2020): beta_t, alpha_t = 1 - beta_t, alpha_bar_t = alpha_1 ... alpha_t.
The forward process adds noise, x_t = sqrt(alpha_bar_t) x0 + sqrt(1 - alpha_bar_t) eps; a network learns to predict
eps (or x0, or v) from x_t; a sampler runs the process backwards from pure noise x_T to an image x_0.

A timestep t is an index in [0, T) into the schedule tables, the same integer the model sees: table index t is the
paper's step t + 1, so alphas_cumprod[0] = 1 - beta_1 and alphas_cumprod[T - 1] = alpha_bar_T.

    diffusion = create_diffusion(cfg)
    loss = diffusion.training_loss(model, x0)                       # x0: [B, C, H, W] in [-1, 1]
    images = diffusion.sample(ema_model, (16, 3, 32, 32), sampler="ddim", steps=50)
    # the samplers themselves are in samplers.py

This file knows nothing of the network, the data or training: `model` is any callable model(x_t, t) or
model(x_t, t, y) returning a tensor shaped like x_t, the predicted eps, x0 or v (see `objective`).
"""

import math

import torch

from config import BETA_SCHEDULES, LOSS_WEIGHTINGS, OBJECTIVES
from samplers import SAMPLERS, per_step, randn

SKIP_TYPES = ("uniform", "quadratic", "logsnr", "karras")  # the spacings of a sampler's timesteps
KARRAS_RHO = 7.0  # EDM's rho (Karras et al. 2022, Eq. 5)


def _check(ok, message):
    if not ok:
        raise ValueError(message)


def make_beta_schedule(name, timesteps):
    """The noise schedule beta_1 ... beta_T as a float64 tensor [T].

    linear: evenly spaced from 1e-4 to 0.02 for T = 1000 (DDPM); for other T both ends are scaled by 1000 / T as in
        Improved DDPM, so the total noise stays comparable (capped at 0.999, which only T <= 20 reaches).
    cosine: alpha_bar(t) = f(t) / f(0), f(t) = cos^2((t/T + s)/(1 + s) * pi/2), s = 0.008, and
        beta_t = min(1 - alpha_bar(t)/alpha_bar(t-1), 0.999)   (Nichol & Dhariwal 2021, Eq. 17).
    """
    _check(isinstance(timesteps, int) and timesteps > 0, f"timesteps must be a positive integer, got {timesteps!r}")
    if name == "linear":
        scale = 1000 / timesteps
        betas = torch.linspace(scale * 1e-4, scale * 0.02, timesteps, dtype=torch.float64)
        return betas.clamp(max=0.999)
    if name == "cosine":
        s = 0.008
        f = torch.cos((torch.arange(timesteps + 1, dtype=torch.float64) / timesteps + s) / (1 + s) * math.pi / 2) ** 2
        alpha_bar = f / f[0]
        return (1 - alpha_bar[1:] / alpha_bar[:-1]).clamp(max=0.999)
    raise ValueError(f"beta schedule must be one of {', '.join(BETA_SCHEDULES)}, not {name!r}")


def min_snr_weights(alphas_cumprod, objective, gamma=5.0):
    """Min-SNR-gamma loss weights per timestep (Hang et al. 2023), with SNR_t = alpha_bar_t / (1 - alpha_bar_t).

    All three objectives then weight the implied x0 error by min(SNR_t, gamma): the eps loss by min(SNR, gamma) / SNR,
    the v loss by min(SNR, gamma) / (SNR + 1), the x0 loss by min(SNR, gamma).
    """
    snr = alphas_cumprod / (1 - alphas_cumprod)
    clipped_snr = snr.clamp(max=gamma)
    if objective == "eps":
        return clipped_snr / snr
    if objective == "v":
        return clipped_snr / (snr + 1)
    return clipped_snr


def create_diffusion(cfg):
    """The GaussianDiffusion a Config describes (fields timesteps, beta_schedule, objective, loss_weighting,
    num_classes, text_encoder, cond_drop_prob)."""
    betas = make_beta_schedule(cfg.beta_schedule, cfg.timesteps)
    return GaussianDiffusion(betas, objective=cfg.objective, loss_weighting=cfg.loss_weighting,
                             num_classes=cfg.num_classes, cond_drop_prob=cfg.cond_drop_prob,
                             captioned=cfg.text_encoder != "none")


def dynamic_thresholding(x0_pred, percentile):
    """Dynamic thresholding (Saharia et al. 2022, Imagen, Sec. 2.3) of a batch x0_pred [B, C, H, W]:

        s = max(the `percentile` quantile of |x0_pred| over each image's pixels, 1),
        x0 = clamp(x0_pred, -s, s) / s.
    An image already inside [-1, 1] except for a few pixels is clipped as static thresholding would; one that
    guidance pushed far outside is shrunk back into [-1, 1] instead of saturating at the ends.
    """
    s = torch.quantile(x0_pred.abs().flatten(1), percentile, dim=1).clamp(min=1)  # [B]
    s = s.view(-1, *[1] * (x0_pred.ndim - 1))
    return x0_pred.clamp(-s, s) / s


def _infer_device(x_T, model):
    """Where to sample when no device is given: x_T's device, else the model's first parameter's, else the CPU."""
    if x_T is not None:
        return x_T.device
    parameters = getattr(model, "parameters", None)
    first = next(iter(parameters()), None) if callable(parameters) else None
    return first.device if first is not None else torch.device("cpu")


class GaussianDiffusion:
    """The diffusion process of a beta schedule, with the training loss and the samplers built on it.

    A plain class, not an nn.Module: it holds no weights and takes `model` on every call, so the DDP-wrapped model and
    the EMA model both work with one instance. Tables are computed in float64 and kept as float32 tensors [T];
    `extract` copies each to a new device once and reuses the copy.

    objective: what the model predicts, "eps" (the noise), "x0" (the clean image) or "v" (Salimans & Ho 2022).
    loss_weighting: "none" or "min_snr" (Min-SNR-5). num_classes: 0 for unconditional; otherwise label num_classes
    is the null label of classifier-free guidance, used with probability cond_drop_prob during training.
    captioned: the model takes captions as token ids y [B, L] instead; the empty caption (a row of zeros) is their
    null condition. Labels and captions are both called y below.
    """

    def __init__(self, betas, objective="eps", loss_weighting="none", num_classes=0, cond_drop_prob=0.0,
                 captioned=False):
        _check(objective in OBJECTIVES, f"objective must be one of {', '.join(OBJECTIVES)}, not {objective!r}")
        _check(loss_weighting in LOSS_WEIGHTINGS,
               f"loss_weighting must be one of {', '.join(LOSS_WEIGHTINGS)}, not {loss_weighting!r}")
        betas = torch.as_tensor(betas, dtype=torch.float64)
        _check(betas.ndim == 1 and len(betas) > 0 and bool(((betas > 0) & (betas < 1)).all()),
               "betas must be a non-empty 1-D tensor of values between 0 and 1 (exclusive)")
        self.num_timesteps = len(betas)
        self.objective = objective
        self.loss_weighting = loss_weighting
        self.num_classes = num_classes
        self.null_label = num_classes
        self.captioned = captioned
        self.conditional = num_classes > 0 or captioned
        self.cond_drop_prob = cond_drop_prob

        alphas_cumprod = torch.cumprod(1 - betas, dim=0)
        alphas_cumprod_prev = torch.cat([torch.ones(1, dtype=torch.float64), alphas_cumprod[:-1]])
        self.alphas_cumprod_float64 = alphas_cumprod  # samplers build their per-step coefficients from it
        self.betas = betas.float()
        self.alphas_cumprod = alphas_cumprod.float()
        self.sqrt_alphas_cumprod = alphas_cumprod.sqrt().float()
        self.sqrt_one_minus_alphas_cumprod = (1 - alphas_cumprod).sqrt().float()
        # q(x_{t-1} | x_t, x0), DDPM Eq. 6-7; the variance is 0 at t = 0, so its log is clamped to stay finite
        posterior_variance = (1 - alphas_cumprod_prev) / (1 - alphas_cumprod) * betas
        self.posterior_variance = posterior_variance.float()
        self.posterior_log_variance_clipped = posterior_variance.clamp(min=1e-20).log().float()
        self.posterior_mean_coef1 = (alphas_cumprod_prev.sqrt() * betas / (1 - alphas_cumprod)).float()
        self.posterior_mean_coef2 = ((1 - betas).sqrt() * (1 - alphas_cumprod_prev) / (1 - alphas_cumprod)).float()
        if loss_weighting == "min_snr":
            self.loss_weights = min_snr_weights(alphas_cumprod, objective).float()
        else:
            self.loss_weights = torch.ones(self.num_timesteps)
        self._device_copies = {}

    def extract(self, table, t, x_shape):
        """table[t] for timestep indices t [B], shaped [B, 1, ..., 1] to broadcast against a batch of shape x_shape.

        `table` is one of this object's [T] tables; its copy on t's device is made once and cached, because a copy
        at every call would make the host wait for the GPU.
        """
        key = (id(table), t.device)
        if key not in self._device_copies:
            self._device_copies[key] = table.to(t.device)
        return self._device_copies[key][t].reshape(-1, *[1] * (len(x_shape) - 1))

    # --- the forward process and its posterior ------------------------------------------------------------------

    def q_sample(self, x0, t, noise=None):
        """Sample x_t ~ q(x_t | x0) = N(sqrt(alpha_bar_t) x0, (1 - alpha_bar_t) I)   (DDPM Eq. 4):

            x_t = sqrt(alpha_bar_t) x0 + sqrt(1 - alpha_bar_t) noise,   x0, noise: [B, C, H, W], t: [B]
        noise defaults to a fresh N(0, I) draw from torch's global RNG.
        """
        if noise is None:
            noise = torch.randn_like(x0)
        return (self.extract(self.sqrt_alphas_cumprod, t, x0.shape) * x0
                + self.extract(self.sqrt_one_minus_alphas_cumprod, t, x0.shape) * noise)

    def q_posterior(self, x0, x_t, t):
        """Mean, variance and log-variance of q(x_{t-1} | x_t, x0) = N(mu_tilde, beta_tilde I)   (DDPM Eq. 6-7):

            mu_tilde = sqrt(alpha_bar_prev) beta_t / (1 - alpha_bar_t) x0
                       + sqrt(alpha_t) (1 - alpha_bar_prev) / (1 - alpha_bar_t) x_t,
            beta_tilde = (1 - alpha_bar_prev) / (1 - alpha_bar_t) beta_t,
        where alpha_bar_prev = alpha_bar_{t-1} (1 at t = 0). Returns mean [B, C, H, W], variance and log_variance
        [B, 1, ..., 1].
        """
        mean = (self.extract(self.posterior_mean_coef1, t, x_t.shape) * x0
                + self.extract(self.posterior_mean_coef2, t, x_t.shape) * x_t)
        variance = self.extract(self.posterior_variance, t, x_t.shape)
        log_variance = self.extract(self.posterior_log_variance_clipped, t, x_t.shape)
        return mean, variance, log_variance

    # --- converting between eps, x0 and v (all follow from Eq. 4 at a fixed x_t) ----------------------------------

    def predict_x0_from_eps(self, x_t, t, eps):
        """x0 = (x_t - sqrt(1 - alpha_bar_t) eps) / sqrt(alpha_bar_t)   (DDPM Eq. 15, Eq. 4 solved for x0)."""
        return ((x_t - self.extract(self.sqrt_one_minus_alphas_cumprod, t, x_t.shape) * eps)
                / self.extract(self.sqrt_alphas_cumprod, t, x_t.shape))

    def predict_eps_from_x0(self, x_t, t, x0):
        """eps = (x_t - sqrt(alpha_bar_t) x0) / sqrt(1 - alpha_bar_t)   (Eq. 4 solved for eps)."""
        return ((x_t - self.extract(self.sqrt_alphas_cumprod, t, x_t.shape) * x0)
                / self.extract(self.sqrt_one_minus_alphas_cumprod, t, x_t.shape))

    def get_v(self, x0, t, noise):
        """The v target v = sqrt(alpha_bar_t) noise - sqrt(1 - alpha_bar_t) x0   (Salimans & Ho 2022, Sec. 4)."""
        return (self.extract(self.sqrt_alphas_cumprod, t, x0.shape) * noise
                - self.extract(self.sqrt_one_minus_alphas_cumprod, t, x0.shape) * x0)

    def predict_x0_from_v(self, x_t, t, v):
        """x0 = sqrt(alpha_bar_t) x_t - sqrt(1 - alpha_bar_t) v."""
        return (self.extract(self.sqrt_alphas_cumprod, t, x_t.shape) * x_t
                - self.extract(self.sqrt_one_minus_alphas_cumprod, t, x_t.shape) * v)

    def predict_eps_from_v(self, x_t, t, v):
        """eps = sqrt(1 - alpha_bar_t) x_t + sqrt(alpha_bar_t) v."""
        return (self.extract(self.sqrt_one_minus_alphas_cumprod, t, x_t.shape) * x_t
                + self.extract(self.sqrt_alphas_cumprod, t, x_t.shape) * v)

    def null_condition(self, y):
        """The null condition in the form of y: the null label for labels [B], the empty caption for captions."""
        return torch.zeros_like(y) if self.captioned else torch.full_like(y, self.null_label)

    def model_predictions(self, model, x_t, t, y=None, guidance_scale=1.0, clip_denoised=False,
                          dynamic_threshold=0.0):
        """The model's noise and clean-image predictions (eps, x0_pred) at x_t [B, C, H, W], t [B], in float32.

        The raw output is eps, x0 or v per `objective`; the other two follow from Eq. 4 at this x_t.
        Classifier-free guidance (Ho & Salimans 2022, Eq. 6 with our w = their w + 1) when y is given and
        w = guidance_scale != 1: one model call on the doubled batch [x_t, x_t] with labels [y, null], then
            eps = eps_uncond + w (eps_cond - eps_uncond);
        at w = 0 that is eps_uncond alone, so the model is called once with the null labels only.
        clip_denoised clamps x0_pred to [-1, 1] (or, with a percentile dynamic_threshold = p in (0, 1), applies
        dynamic_thresholding at p) and recomputes eps from it, so that (eps, x0_pred) stay consistent with x_t (as
        improved-diffusion does for DDIM).
        """
        if y is not None and guidance_scale == 0:
            output = model(x_t, t, self.null_condition(y))
        elif y is not None and guidance_scale != 1:
            labels = torch.cat([y, self.null_condition(y)])
            output = model(torch.cat([x_t, x_t]), torch.cat([t, t]), labels)
            output_cond, output_uncond = output.float().chunk(2)
            # eps is an affine function of the raw output (eps, x0 or v) at a fixed x_t and t, so guiding the raw
            # output guides eps exactly as the formula above says.
            output = output_uncond + guidance_scale * (output_cond - output_uncond)
        elif y is not None:
            output = model(x_t, t, y)
        else:
            output = model(x_t, t)
        # A float32 copy, never the network's own tensor: under CUDA graphs (sample.py --compile on CUDA) that lives
        # in a buffer which the next call overwrites, and samplers keep predictions from one step to the next.
        output = output.to(torch.float32, copy=True)

        if self.objective == "eps":
            eps = output
            x0_pred = self.predict_x0_from_eps(x_t, t, eps)
        elif self.objective == "x0":
            x0_pred = output
            eps = self.predict_eps_from_x0(x_t, t, x0_pred)
        else:
            x0_pred = self.predict_x0_from_v(x_t, t, output)
            eps = self.predict_eps_from_v(x_t, t, output)
        if clip_denoised:
            if dynamic_threshold > 0:
                x0_pred = dynamic_thresholding(x0_pred, dynamic_threshold)
            else:
                x0_pred = x0_pred.clamp(-1, 1)
            eps = self.predict_eps_from_x0(x_t, t, x0_pred)
        return eps, x0_pred

    # --- training ---------------------------------------------------------------------------------------------

    def training_loss(self, model, x0, y=None, t=None, noise=None, teacher=None):
        """The denoising loss of a batch x0 [B, C, H, W] (DDPM Alg. 1; Eq. 14 for eps), a float32 scalar:

            t ~ Uniform{0, ..., T-1},  noise ~ N(0, I),  x_t = q_sample(x0, t, noise),
            loss = mean over b of  w_t * mean over pixels of (model(x_t, t) - target)^2,
        target = noise (eps), x0 (x0) or get_v(x0, t, noise) (v); w_t = 1, or min_snr_weights with "min_snr".
        Labels y [B] (or captions [B, L]) are each replaced by the null condition with probability cond_drop_prob,
        so the model also learns the unconditional prediction that guidance needs. t and noise come from torch's
        global RNG on x0's device unless given.

        teacher: a frozen model of the same objective whose output teacher(x_t, t, y) is the target instead, with
        the same x_t, t and (dropped) labels: knowledge distillation (distillation.OutputDistillation).
        """
        x0 = x0.float()
        batch_size = x0.shape[0]
        if t is None:
            t = torch.randint(0, self.num_timesteps, (batch_size,), device=x0.device)
        if noise is None:
            # Drawn in (B, C, H, W) order whatever x0's memory layout, so channels-last draws the same noise.
            noise = torch.randn(x0.shape, dtype=x0.dtype, device=x0.device)
        x_t = self.q_sample(x0, t, noise)
        if y is None:
            output = model(x_t, t)
        else:
            _check(self.conditional, "got class labels y, but this diffusion is unconditional (num_classes=0)")
            if self.cond_drop_prob > 0:
                drop = torch.rand(batch_size, device=y.device) < self.cond_drop_prob
                y = torch.where(drop.view(-1, *[1] * (y.ndim - 1)), self.null_condition(y), y)
            output = model(x_t, t, y)

        if teacher is not None:
            with torch.no_grad():
                target = (teacher(x_t, t) if y is None else teacher(x_t, t, y)).float()
        elif self.objective == "eps":
            target = noise
        elif self.objective == "x0":
            target = x0
        else:
            target = self.get_v(x0, t, noise)
        mse = (output.float() - target).pow(2).mean(dim=tuple(range(1, x0.ndim)))  # [B]
        return (self.extract(self.loss_weights, t, mse.shape) * mse).mean()

    # --- sampling ---------------------------------------------------------------------------------------------

    def sampling_timesteps(self, steps, top=None, skip_type="uniform"):
        """The timesteps a sampler visits: `steps` ints in decreasing order from top - 1 (top: T, or SDEdit's t0).

        uniform, quadratic: DDIM App. D.2 in the paper's 1-based steps, tau_i = floor(c i) or floor(c i^2) for
            i = 1 ... steps, with c such that tau_steps = top; the table index is tau_i - 1. So the smallest is
            about top / steps - 1, and the step after it goes to the clean image (diffusers calls this uniform
            spacing "trailing"). (Visiting t = 0 as well, as improved-diffusion does, would leave DPM-Solver++ a
            second-order step with a very uneven step ratio: five times the error at 20 steps in the Gaussian test.)
        logsnr: evenly spaced in lambda = log(alpha_t / sigma_t) = log-SNR / 2 from t = top - 1 down to t = 0, as
            DPM-Solver spaces its steps (Lu et al. 2022, Sec. 3.3; diffusers' use_lu_lambdas).
        karras: EDM's sigma_i = (sigma_max^(1/rho) + i / (steps - 1) (sigma_min^(1/rho) - sigma_max^(1/rho)))^rho,
            rho = 7, with sigma = sqrt((1 - alpha_bar) / alpha_bar) from t = top - 1 down to t = 0 (Karras et al.
            2022, Eq. 5; diffusers' use_karras_sigmas): short steps near the data, where detail is made.
        Both visit t = 0 last, the step after it going to the clean image. Their targets fall between the integer
        timesteps the model was trained on: each is rounded to the nearest in lambda, and targets that round to one
        timestep are pushed apart, so that there are always `steps` distinct timesteps.
        """
        top = self.num_timesteps if top is None else top
        _check(isinstance(steps, int) and 1 <= steps <= top, f"steps must be an integer from 1 to {top}, got {steps!r}")
        _check(skip_type in SKIP_TYPES, f"skip_type must be one of {', '.join(SKIP_TYPES)}, not {skip_type!r}")
        if skip_type == "uniform":
            return [i * top // steps - 1 for i in range(1, steps + 1)][::-1]
        if skip_type == "quadratic":
            timesteps = [max(i * i * top // steps ** 2 - 1, 0) for i in range(1, steps + 1)]
        else:
            timesteps = self.continuous_spacing(steps, top, skip_type)
        # Targets less than one timestep apart round to one: push them apart, up from the bottom, then down from
        # top - 1 (which always leaves them in [0, top - 1], since steps <= top).
        for i in range(1, steps):
            timesteps[i] = max(timesteps[i], timesteps[i - 1] + 1)
        timesteps[-1] = min(timesteps[-1], top - 1)
        for i in range(steps - 2, -1, -1):
            timesteps[i] = min(timesteps[i], timesteps[i + 1] - 1)
        return timesteps[::-1]

    def continuous_spacing(self, steps, top, skip_type):
        """The logsnr or karras timesteps of sampling_timesteps, rounded, in increasing order (maybe repeated)."""
        alpha_bar = self.alphas_cumprod_float64[:top]
        lambdas = 0.5 * (alpha_bar / (1 - alpha_bar)).log()  # decreasing in t
        lambda_max, lambda_min = lambdas[0].item(), lambdas[-1].item()
        if steps == 1:
            targets = torch.tensor([lambda_min], dtype=torch.float64)
        elif skip_type == "logsnr":
            targets = torch.linspace(lambda_min, lambda_max, steps, dtype=torch.float64)
        else:
            # sigma = sqrt((1 - alpha_bar) / alpha_bar) = exp(-lambda); the ramp runs from sigma_max (t = top - 1).
            ramp = torch.linspace(0, 1, steps, dtype=torch.float64)
            inverse_rho = 1 / KARRAS_RHO
            sigma_min, sigma_max = math.exp(-lambda_max), math.exp(-lambda_min)
            top_root, bottom_root = sigma_max ** inverse_rho, sigma_min ** inverse_rho
            sigmas = (top_root + ramp * (bottom_root - top_root)) ** KARRAS_RHO
            targets = -sigmas.log()
        # The nearest integer timestep in lambda of each target, from the largest t (smallest lambda) down.
        nearest = (lambdas[None, :] - targets[:, None]).abs().argmin(dim=1)  # [steps]
        return sorted(int(t) for t in nearest)

    def step_alpha_bars(self, timesteps):
        """alpha_bar at each visited timestep and at the one after it (1 after the last: the clean image), float64 [N]
        each. For a subset of timesteps this respaces the chain: the step from t to the next kept timestep is a
        DDPM step with beta = 1 - alpha_bar_t / alpha_bar_prev (Improved DDPM), so no sampler needs a special case."""
        alpha_bar = self.alphas_cumprod_float64[timesteps]
        alpha_bar_prev = torch.cat([alpha_bar[1:], torch.ones(1, dtype=torch.float64)])
        return alpha_bar, alpha_bar_prev

    def predictor(self, model, y=None, guidance_scale=1.0, clip_denoised=True, dynamic_threshold=0.0):
        """predict(x_t, t) -> (eps, x0_pred) for an int timestep t: what every sampler calls (model_predictions with
        the guidance and clipping asked for, at t for the whole batch)."""
        def predict(x_t, t):
            t_batch = torch.full((x_t.shape[0],), t, device=x_t.device, dtype=torch.long)
            return self.model_predictions(model, x_t, t_batch, y, guidance_scale, clip_denoised, dynamic_threshold)
        return predict

    def sdedit_steps(self, steps, strength):
        """SDEdit's t0 = round(strength x T) (the paper's step; table index t0 - 1) and the number of the chain's
        `steps` that fall below it, ceil(steps x t0 / T): (t0, steps below t0)."""
        t0 = round(strength * self.num_timesteps)
        return t0, math.ceil(steps * t0 / self.num_timesteps)

    def sdedit_start(self, init_image, strength, noise):
        """SDEdit (Meng et al. 2022): the input image noised to t0 = round(strength x T) by q(x_t0 | x_0), with
        `noise` as its eps, and t0. strength 0 is the image itself (t0 = 0), 1 ignores it (the noise itself, t0 = T).
        t0 is the paper's step, table index t0 - 1."""
        t0, _ = self.sdedit_steps(1, strength)
        if t0 == 0:
            return init_image.expand(noise.shape).clone(), 0
        if t0 == self.num_timesteps:  # x_T itself: alpha_bar_T is small but not 0, and strength 1 ignores the input
            return noise, t0
        t = torch.full((noise.shape[0],), t0 - 1, device=noise.device)
        return self.q_sample(init_image.expand(noise.shape), t, noise), t0

    def inpainting_hook(self, timesteps, mask, x_known, generator):
        """on_step for inpainting (as RePaint, without resampling): after every step the pixels where mask == 1 are
        replaced by x_known noised to the new step's level with Eq. 4, so they end exactly equal to x_known."""
        keep = mask > 0.5
        alpha_bar_prev = self.step_alpha_bars(timesteps)[1]
        sqrt_alpha_bar_prev = per_step(alpha_bar_prev.sqrt(), x_known)
        sqrt_one_minus_alpha_bar_prev = per_step((1 - alpha_bar_prev).sqrt(), x_known)

        def on_step(i, x_t, x0_pred, x_prev):
            z = randn(x_prev.shape, generator, x_prev.device)
            x_known_prev = sqrt_alpha_bar_prev[i] * x_known + sqrt_one_minus_alpha_bar_prev[i] * z
            return torch.where(keep, x_known_prev, x_prev)
        return on_step

    @torch.no_grad()
    def sample(self, model, shape, sampler="ddpm", steps=None, eta=0.0, clip_denoised=True, generator=None, y=None,
               guidance_scale=1.0, x_T=None, return_trajectory=False, *, skip_type="uniform", dynamic_threshold=0.0,
               init_image=None, strength=1.0, mask=None, device=None, **sampler_options):
        """Generate a batch x_0 of shape `shape` [B, C, H, W] by running the reverse process from x_T.

        model: a callable model(x_t, t) or model(x_t, t, y): the network (EMA or not) or an analytic predictor.
        sampler: a name in samplers.SAMPLERS: "ddpm" (ancestral, DDPM Alg. 2), "ddim" (DDIM Eq. 12) or "dpmpp2m"
            (DPM-Solver++(2M)). eta is DDIM's noise scale (0 = deterministic, 1); other samplers' own options go
            in sampler_options, e.g. ddpm_variance="auto" | "large" | "small" (see samplers.ddpm_sample).
        steps: model evaluations; None = all T. Fewer visit a subset spaced by skip_type ("uniform", "quadratic",
            "logsnr" or "karras": sampling_timesteps); the model always sees the original timestep indices.
        clip_denoised: clamp each x0_pred and the result to [-1, 1]; dynamic_threshold: with clip_denoised, a
            percentile p in (0, 1) uses dynamic thresholding at p instead (Imagen; 0.995 is usual), 0 = static.
        generator: draws all noise, x_T included; or a list of B generators, one per image (samplers.randn).
            y, guidance_scale: labels [B] and the classifier-free guidance scale w (1 = conditional, 0 =
            unconditional).
        x_T: the starting noise (drawn with `generator` when None). device: where to sample (default: x_T's device,
            else the model's, else the CPU).
        init_image [1 or B, C, H, W], strength: SDEdit. The chain starts from init_image noised to t0 =
            round(strength x T) with x_T as the noise (sdedit_start) and runs only its steps below t0:
            ceil(steps x t0 / T) of them. strength 0 returns init_image, 1 ignores it.
        mask [1 or B, 1, H, W]: inpainting of init_image: pixels where mask == 1 are kept (inpainting_hook); with
            strength 1 (the usual) the other pixels are made from pure noise.
        Returns x_0 [B, C, H, W] float32, or (x_0, trajectory) with return_trajectory: one (t, x_t, x0_pred) per
        step in sampling order, t the timestep fed to the model, x_t the state before the step, both on the CPU.
        """
        _check(sampler in SAMPLERS, f"sampler must be one of {', '.join(SAMPLERS)}, not {sampler!r}")
        removed = sorted(set(sampler_options) & {"start_t", "x_known", "progress"})
        _check(not removed, f"{', '.join(removed)} is no longer an argument of sample(): SDEdit and inpainting take "
                            f"init_image, strength and mask (see README, Layout)")
        options = dict(sampler_options, **({"eta": eta} if eta != 0 else {}))
        unknown = sorted(set(options) - set(SAMPLERS[sampler].options))
        _check(not unknown, f"{', '.join(unknown)} does not apply to the {sampler} sampler")
        options = {**SAMPLERS[sampler].options, **options}  # each sampler checks its own option values
        _check(0 <= dynamic_threshold < 1, f"dynamic_threshold must be a percentile in [0, 1), got {dynamic_threshold}")
        _check(0 <= strength <= 1, f"strength must be in [0, 1], got {strength}")
        _check(init_image is not None or (strength == 1 and mask is None),
               "strength and mask need init_image, the picture to start from")
        if x_T is not None:
            _check(tuple(x_T.shape) == tuple(shape), f"x_T has shape {tuple(x_T.shape)}, but shape is {tuple(shape)}")
        _check(guidance_scale == 1 or y is not None, "classifier-free guidance (guidance_scale != 1) needs labels y")
        _check(y is None or self.conditional, "got class labels y, but this diffusion is unconditional")
        device = torch.device(device) if device is not None else _infer_device(x_T, model)
        x_T = randn(shape, generator, device) if x_T is None else x_T.to(device, torch.float32)
        y = y.to(device) if y is not None else None

        # SDEdit: start from the input noised to t0, and run the chain's steps below t0 only.
        top = self.num_timesteps
        if init_image is not None:
            init_image = init_image.to(device, torch.float32)
            x_T, top = self.sdedit_start(init_image, strength, x_T)
            if top == 0:  # strength 0: nothing to denoise
                return (x_T, []) if return_trajectory else x_T
        steps = top if steps is None else self.sdedit_steps(steps, strength)[1]  # all of them at strength 1
        timesteps = self.sampling_timesteps(steps, top, skip_type)

        # After every step: the trajectory, and for inpainting the known pixels put back.
        trajectory = []
        inpaint = None
        if mask is not None:
            inpaint = self.inpainting_hook(timesteps, mask.to(device), init_image.expand(shape), generator)

        def on_step(i, x_t, x0_pred, x_prev):
            if return_trajectory:
                trajectory.append((timesteps[i], x_t.cpu(), x0_pred.cpu()))
            return x_prev if inpaint is None else inpaint(i, x_t, x0_pred, x_prev)

        predict = self.predictor(model, y, guidance_scale, clip_denoised, dynamic_threshold)
        x0 = SAMPLERS[sampler].run(self, predict, x_T, timesteps, generator, on_step, **options)
        if clip_denoised:
            x0 = x0.clamp(-1, 1)
        return (x0, trajectory) if return_trajectory else x0
