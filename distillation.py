"""Distillation: a student that learns from a frozen teacher instead of from the data's targets.

    objective = ProgressiveDistillation(diffusion, teacher, student_steps=8)   # teacher: a frozen model
    loss = objective.training_loss(student, x0, y)   # what train.py's step calls in place of the diffusion loss
    objective = OutputDistillation(diffusion, teacher)   # the teacher's output at every timestep (--distill-from)

Progressive distillation (Salimans & Ho 2022) makes a student whose one DDIM step does what two of its teacher's do.

A round distills a teacher sampled with 2N DDIM steps into a student of N steps; the student then teaches the next
round (distill.py runs the rounds, each a train.py run). The student's grid is every other timestep of the teacher's
(GaussianDiffusion.sampling_timesteps(N) is sampling_timesteps(2N)[::2]), so student step k, from t to t'', is the
teacher's two steps t -> t' -> t''. Algorithm 2 of the paper, in the DDPM symbols alpha_t = sqrt(alpha_bar_t),
sigma_t = sqrt(1 - alpha_bar_t):

    z_t   = alpha_t x + sigma_t eps                            the training image, noised to a student timestep t
    z_t'  = DDIM step of the teacher from z_t to t'            (its x0 prediction clipped to [-1, 1], as sampling does)
    z_t'' = DDIM step of the teacher from z_t' to t''
    x~    = (z_t'' - (sigma_t'' / sigma_t) z_t) / (alpha_t'' - (sigma_t'' / sigma_t) alpha_t)
the x0 that takes one DDIM step from z_t exactly to z_t''; when t'' is the clean image, x~ = z_t''. The student
learns x~ with the paper's truncated-SNR weight, max(SNR_t, 1) ||x~ - x0_student(z_t, t)||^2, whatever it predicts
(eps, x0 or v: its x0 prediction is derived).

A class-conditional teacher is distilled at a fixed guidance scale (guidance_scale): the teacher's steps are guided,
and the student learns the guided result from the label alone, so it samples at guidance 1 (its config says so).
Its guidance is then in its weights: when it teaches the next round, its steps are not guided again
(teacher_guidance), and its students keep its distill_guidance, the scale the whole chain stands for.

Imports config; no script.
"""

import dataclasses

import torch

import config

DATA_FIELDS = ("dataset", "data_dir", "random_flip")  # a student learns from its teacher's data unless told otherwise


def student_config(cfg, teacher_cfg, overrides):
    """The config of a new distillation run: `cfg` with the teacher's architecture and diffusion
    (config.ARCHITECTURE_FIELDS), and its data unless `overrides` (the fields a user set) name other data. A flag
    that would change the architecture raises ConfigError."""
    config.check_same_model(cfg, overrides, teacher_cfg, f"the teacher {cfg.teacher}",
                            "a student has its teacher's architecture")
    inherited = [*config.ARCHITECTURE_FIELDS, *(name for name in DATA_FIELDS if name not in overrides)]
    if teacher_cfg.teacher:  # the teacher is a student: its guidance is in its weights, and its students keep it
        if "distill_guidance" in overrides and cfg.distill_guidance != teacher_cfg.distill_guidance:
            raise config.ConfigError(f"--distill-guidance {cfg.distill_guidance:g}: the teacher {cfg.teacher} is a "
                                     f"student distilled at guidance {teacher_cfg.distill_guidance:g}, which is in "
                                     f"its weights; leave the flag out (its students keep "
                                     f"{teacher_cfg.distill_guidance:g}), or distil the original model at "
                                     f"{cfg.distill_guidance:g}")
        inherited.append("distill_guidance")
    return dataclasses.replace(cfg, **{name: getattr(teacher_cfg, name) for name in inherited})


def teacher_guidance(cfg, teacher_cfg):
    """The guidance scale of the teacher's steps in the run `cfg` distilling `teacher_cfg`: the run's
    distill_guidance for a trained model, 1 for a distilled student (its guidance is already in its weights)."""
    return 1.0 if teacher_cfg.teacher else cfg.distill_guidance


class ProgressiveDistillation:
    """The distillation loss of one round, with the rest of `diffusion` (sampling, tables) passed through, so that
    the training loop and its previews use it as they use a GaussianDiffusion."""

    def __init__(self, diffusion, teacher, student_steps, guidance_scale=1.0):
        if not (1 <= student_steps and 2 * student_steps <= diffusion.num_timesteps):
            raise ValueError(f"student_steps must be from 1 to T / 2, got {student_steps}")
        self.diffusion = diffusion
        self.teacher = teacher.eval().requires_grad_(False)
        self.student_steps = student_steps
        self.guidance_scale = guidance_scale
        teacher_grid = diffusion.sampling_timesteps(2 * student_steps)  # decreasing, from T - 1
        # Student step k: from teacher_grid[2k] through teacher_grid[2k + 1] to teacher_grid[2k + 2] (-1: clean).
        padded = teacher_grid + [-1]
        self.t = torch.tensor(padded[0:-1:2])         # [N] the student's timesteps
        self.t_mid = torch.tensor(padded[1::2])       # [N] the teacher's step in between
        self.t_next = torch.tensor(padded[2::2])      # [N] where the student's step lands (-1: the clean image)
        # alpha_bar at every timestep, and 1 at index -1: the clean image.
        self.alpha_bar = torch.cat([diffusion.alphas_cumprod_float64, torch.ones(1, dtype=torch.float64)])

    def __getattr__(self, name):
        return getattr(self.diffusion, name)  # sample, num_timesteps, ...: the plain diffusion's

    def coefficients(self, timesteps, like):
        """(alpha, sigma) at int timesteps [B] (-1 = the clean image: 1, 0), shaped [B, 1, 1, 1] like `like`."""
        alpha_bar = self.alpha_bar[timesteps].to(like.device)
        shape = (-1, *[1] * (like.ndim - 1))
        return alpha_bar.sqrt().float().view(shape), (1 - alpha_bar).sqrt().float().view(shape)

    def teacher_step(self, z, t, t_to, y):
        """One DDIM step (eta = 0) of the teacher from z at timesteps t [B] to t_to [B] (-1 = clean)."""
        eps, x0 = self.diffusion.model_predictions(self.teacher, z, t, y, self.guidance_scale, clip_denoised=True)
        alpha_to, sigma_to = self.coefficients(t_to, z)
        return alpha_to * x0 + sigma_to * eps

    @torch.no_grad()
    def target(self, z_t, index, y=None):
        """The x0 target x~ [B, C, H, W] for student step `index` [B] (0 ... N-1) from z_t (module docstring)."""
        t = self.t[index].to(z_t.device)
        t_mid = self.t_mid[index].to(z_t.device)
        t_next = self.t_next[index].to(z_t.device)
        z_mid = self.teacher_step(z_t, t, t_mid, y)
        z_next = self.teacher_step(z_mid, t_mid, t_next, y)
        alpha_t, sigma_t = self.coefficients(t, z_t)
        alpha_next, sigma_next = self.coefficients(t_next, z_t)
        ratio = sigma_next / sigma_t
        return (z_next - ratio * z_t) / (alpha_next - ratio * alpha_t)

    def training_loss(self, model, x0, y=None, index=None, noise=None):
        """max(SNR_t, 1) ||x~ - x0_student(z_t, t)||^2, averaged over pixels and the batch, for x0 [B, C, H, W] and
        student steps `index` [B] drawn uniformly (or given), noise eps [B, C, H, W] (drawn when None); both from
        torch's global RNG, as GaussianDiffusion.training_loss draws them. Labels y are replaced by the null label
        with probability cond_drop_prob, as in training, for teacher and student alike."""
        x0 = x0.float()
        if index is None:
            index = torch.randint(0, self.student_steps, (x0.shape[0],), device=x0.device)
        if noise is None:
            noise = torch.randn(x0.shape, dtype=x0.dtype, device=x0.device)  # (B, C, H, W) order in any layout
        index = index.cpu()
        t = self.t[index]
        alpha_bar = self.alpha_bar[t].to(x0.device)
        t = t.to(x0.device)
        z_t = self.diffusion.q_sample(x0, t, noise)
        if y is not None and self.diffusion.cond_drop_prob > 0:  # as in training: the null label keeps being learnt
            drop = torch.rand(x0.shape[0], device=y.device) < self.diffusion.cond_drop_prob
            y = torch.where(drop.view(-1, *[1] * (y.ndim - 1)), self.diffusion.null_condition(y), y)
        target = self.target(z_t, index, y)  # for the null label, the guided teacher is its unconditional self
        _, x0_pred = self.diffusion.model_predictions(model, z_t, t, y)  # the student's x0, unclipped
        weight = (alpha_bar / (1 - alpha_bar)).clamp(min=1).float()  # truncated SNR: max(SNR_t, 1)
        return (weight * (target - x0_pred).pow(2).mean(dim=(1, 2, 3))).mean()


class OutputDistillation:
    """Knowledge distillation of a smaller network (Hinton et al. 2015), as a pruned U-Net is fine-tuned from its
    original (train.py --distill-from): GaussianDiffusion.training_loss, with the frozen teacher's output at the same
    x_t, timestep and (dropped) label as the target in place of the data's eps, x0 or v. The teacher's prediction is
    the data's target averaged over the images that could have given x_t, so it varies far less from one draw to the
    next, and the student recovers in fewer steps (README, Compression, has the measurements). The rest of
    `diffusion` passes through, as for ProgressiveDistillation."""

    def __init__(self, diffusion, teacher):
        self.diffusion = diffusion
        self.teacher = teacher.eval().requires_grad_(False)

    def __getattr__(self, name):
        return getattr(self.diffusion, name)

    def training_loss(self, model, x0, y=None, t=None, noise=None):
        return self.diffusion.training_loss(model, x0, y, t, noise, teacher=self.teacher)


MATCHED_FIELDS = ("image_size", "channels", "num_classes", "timesteps", "beta_schedule", "objective", "text_encoder",
                  "text_model", "text_dim", "text_layers", "max_caption_length", "vocabulary")


def check_output_teacher(cfg, teacher_state):
    """Raise ConfigError unless the --distill-from checkpoint `teacher_state` predicts what the run `cfg` learns: a
    float model (not compressed, not a few-step student) of the same images, conditions, noise schedule and
    objective (its widths may differ)."""
    if "compression" in teacher_state:
        raise config.ConfigError(f"--distill-from {cfg.distill_from} is compressed; distil from a float checkpoint")
    teacher_cfg = config.config_from_dict(teacher_state["config"])
    if teacher_cfg.teacher:
        raise config.ConfigError(f"--distill-from {cfg.distill_from} is a few-step student, trained only at its own "
                                 f"timesteps; distil from the model it was distilled from")
    differ = [name for name in MATCHED_FIELDS if getattr(cfg, name) != getattr(teacher_cfg, name)]
    if differ:
        name = differ[0]
        raise config.ConfigError(f"--distill-from {cfg.distill_from} has {name} {getattr(teacher_cfg, name)!r} and "
                                 f"this run {getattr(cfg, name)!r}: a model learns the outputs of one with its "
                                 f"images, conditions, schedule and objective")
