"""distillation.py and distill.py: the target is two teacher DDIM steps, a straight ODE costs nothing to distil, and
a distillation run is a train.py run (teacher's weights to start, exact resume, rounds, the student's step count
as the sampling default).

Each test works in its own temporary folder with a tiny hand-made teacher checkpoint (16x16, T = 20).
"""

from pathlib import Path

import pytest
import torch

import config
import distill
import inference
import samplers
import train
import utils
from conftest import TINY, randomise_zero_layers_, tiny_checkpoint
from diffusion import create_diffusion
from distillation import OutputDistillation, ProgressiveDistillation
from model import create_model

TRAIN_FLAGS = ["--batch-size", "4", "--num-workers", "0", "--sample-every", "0", "--device", "cpu"]


@pytest.fixture(autouse=True)
def teacher(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    return tiny_checkpoint("teacher", 0, seed=0)


def tiny_teacher(objective="v", num_classes=0):
    cfg = config.get_config("demo", objective=objective, **{**TINY, "num_classes": num_classes})
    torch.manual_seed(0)
    return randomise_zero_layers_(create_model(cfg)).eval(), create_diffusion(cfg)


@pytest.mark.parametrize("num_classes,guidance", [(0, 1.0), (4, 3.0)])
def test_the_target_is_what_two_teacher_ddim_steps_reach(num_classes, guidance):
    # With labels, at a fixed guidance scale: the teacher's steps are guided ones.
    teacher, diffusion = tiny_teacher(num_classes=num_classes)
    y = torch.tensor([0, 1, 2, 3]) if num_classes else None
    objective = ProgressiveDistillation(diffusion, teacher, student_steps=4, guidance_scale=guidance)  # 8 steps
    grid = diffusion.sampling_timesteps(8)
    assert objective.t.tolist() == grid[0::2] and objective.t_mid.tolist() == grid[1::2]
    assert objective.t_next.tolist() == grid[2::2] + [-1]  # the last student step lands on the clean image

    z_t = torch.randn(4, 3, 16, 16, generator=torch.Generator().manual_seed(1))
    predict = diffusion.predictor(teacher, y, guidance)  # the teacher as the samplers see it (x0 clipped)
    for k in range(4):
        index = torch.full((4,), k)
        target = objective.target(z_t, index, y)
        # The teacher's own DDIM chain from z_t over its steps grid[2k:], recorded after two steps.
        states = []
        samplers.ddim_sample(diffusion, predict, z_t, grid[2 * k:], None,
                             lambda i, x_t, x0_pred, x_prev: states.append(x_prev) or x_prev)
        z_next = states[1]
        # One DDIM step from z_t with x0 = target (and the eps it implies) lands on z_next.
        t, t_next = grid[2 * k], (grid[2 * k + 2] if k < 3 else None)
        alpha_bar_t = diffusion.alphas_cumprod_float64[t]
        alpha_bar_next = diffusion.alphas_cumprod_float64[t_next] if t_next is not None else torch.tensor(1.0)
        eps = (z_t - alpha_bar_t.sqrt() * target) / (1 - alpha_bar_t).sqrt()
        one_step = alpha_bar_next.sqrt() * target + (1 - alpha_bar_next).sqrt() * eps
        torch.testing.assert_close(one_step.float(), z_next, atol=2e-4, rtol=0)
    # A wrong pairing (one teacher step instead of two) would miss: the second state differs from the first.
    assert (states[1] - states[0]).abs().max() > 0.01
    if num_classes:  # and guidance changes the target
        unguided = ProgressiveDistillation(diffusion, teacher, student_steps=4).target(z_t, torch.zeros(4).long(), y)
        assert (unguided - objective.target(z_t, torch.zeros(4).long(), y)).abs().max() > 0.01


class ConstantX0(torch.nn.Module):
    """Predicts the same clean image c at every x_t and t: its probability-flow ODE is a straight line, on which
    one DDIM step goes exactly as far as two."""

    def __init__(self, scale=0.0):
        super().__init__()
        self.c = torch.nn.Parameter(torch.linspace(-0.5, 0.5, 3 * 16 * 16).view(1, 3, 16, 16))
        self.scale = scale  # > 0: the prediction also depends on x_t, and the ODE bends

    def forward(self, x_t, t):
        return self.c.expand_as(x_t) + self.scale * x_t


def test_a_student_equal_to_a_straight_teacher_has_zero_loss():
    cfg = config.get_config("demo", objective="x0", **TINY)
    diffusion = create_diffusion(cfg)
    x0 = torch.rand(8, 3, 16, 16, generator=torch.Generator().manual_seed(0)) * 2 - 1
    straight = ConstantX0()
    loss = ProgressiveDistillation(diffusion, straight, 4).training_loss(straight, x0)
    assert loss.item() < 1e-10
    bent = ConstantX0(scale=0.5)
    loss = ProgressiveDistillation(diffusion, bent, 4).training_loss(bent, x0)
    assert loss.item() > 1e-3


def weights(run):
    return utils.load_checkpoint(Path("checkpoints") / run / "last.pt")


def test_a_distillation_run_starts_as_its_teacher_and_resumes_bit_for_bit():
    flags = ["--preset", "demo", "--teacher", "checkpoints/teacher/last.pt", "--student-steps", "2", *TRAIN_FLAGS,
             "--lr-schedule", "constant", "--warmup-steps", "0"]
    # Zero steps of learning rate 0 would leave it the teacher: check the start through a 1-step run at lr ~0.
    train.main([*flags, "--run-name", "first", "--max-steps", "1", "--lr", "1e-30"])
    teacher_ema = utils.load_checkpoint("checkpoints/teacher/last.pt")["ema"]
    start = weights("first")
    for name, tensor in teacher_ema.items():
        torch.testing.assert_close(start["model"][name], tensor)
    # The architecture comes from the teacher, whatever the preset says.
    assert start["config"]["teacher"] == "checkpoints/teacher/last.pt" and start["config"]["student_steps"] == 2
    assert start["config"]["channel_mults"] == list(TINY["channel_mults"]) and start["config"]["timesteps"] == 20

    train.main([*flags, "--run-name", "straight", "--max-steps", "4"])
    train.main([*flags, "--run-name", "stopped", "--max-steps", "2"])
    train.main([*flags, "--run-name", "stopped", "--max-steps", "4"])
    straight, resumed = weights("straight"), weights("stopped")
    assert straight["step"] == resumed["step"] == 4
    for name, tensor in straight["model"].items():
        assert torch.equal(tensor, resumed["model"][name]), name
    assert any(not torch.equal(tensor, teacher_ema[name]) for name, tensor in straight["model"].items())


def test_distill_runs_the_rounds_and_the_student_samples_in_its_steps(capsys):
    argv = ["--teacher", "teacher", "--start-steps", "4", "--end-steps", "2", "--steps-per-round", "2", *TRAIN_FLAGS]
    distill.main(argv)
    first, second = weights("teacher-pd4"), weights("teacher-pd2")
    assert first["config"]["student_steps"] == 4 and second["config"]["student_steps"] == 2
    assert second["config"]["teacher"] == str(Path("checkpoints/teacher-pd4/last.pt"))
    assert first["step"] == second["step"] == 2
    path = Path("checkpoints/teacher-pd2/last.pt")
    _, cfg = inference.load_model_from_checkpoint(path, second)
    assert inference.sampling_steps(cfg, inference.SamplingOptions()) == 2  # the default is the student's
    assert inference.sampling_steps(cfg, inference.SamplingOptions(steps=5)) == 5
    # Run again: both rounds are done and skipped.
    capsys.readouterr()
    distill.main(argv)
    assert capsys.readouterr().out.count("done before, skipped") == 2


@pytest.mark.parametrize("flags,message", [
    (["--start-steps", "6"], "powers of two"),
    (["--start-steps", "2", "--end-steps", "4"], "powers of two"),
    (["--start-steps", "16"], "needs a teacher of at least 32 timesteps"),
    (["--teacher", "nobody"], "run 'nobody' has no checkpoint"),
])
def test_distill_refuses_impossible_rounds_in_one_sentence(flags, message, capsys):
    with pytest.raises(SystemExit) as exit:
        distill.main(["--teacher", "teacher", *flags])
    assert exit.value.code != 0 and message in capsys.readouterr().err


def test_a_guided_chain_guides_only_the_first_teacher(monkeypatch, capsys):
    # A student distilled at guidance 3 has the guidance in its weights: as the next round's teacher its steps are
    # not guided again (guiding them would compound to a much larger scale), and its student keeps the scale.
    tiny_checkpoint("labelled", num_classes=4, seed=0)
    applied = []

    def recording(diffusion, teacher, student_steps, guidance_scale=1.0):
        applied.append(guidance_scale)
        return ProgressiveDistillation(diffusion, teacher, student_steps, guidance_scale)

    monkeypatch.setattr(train, "ProgressiveDistillation", recording)
    distill.main(["--teacher", "labelled", "--start-steps", "4", "--end-steps", "2", "--steps-per-round", "1",
                  "--distill-guidance", "3", *TRAIN_FLAGS])
    assert applied == [3.0, 1.0]
    assert weights("labelled-pd4")["config"]["distill_guidance"] == weights("labelled-pd2")["config"][
        "distill_guidance"] == 3.0
    # A round from a guided student keeps its scale without the flag, and refuses another one.
    flags = ["--preset", "demo", "--teacher", "checkpoints/labelled-pd4/last.pt", "--student-steps", "2",
             "--max-steps", "1", *TRAIN_FLAGS]
    train.main([*flags, "--run-name", "inherits"])
    assert weights("inherits")["config"]["distill_guidance"] == 3.0 and applied[-1] == 1.0
    capsys.readouterr()
    with pytest.raises(SystemExit) as exit:
        train.main([*flags, "--run-name", "other", "--distill-guidance", "5"])
    assert exit.value.code != 0 and "is a student distilled at guidance 3" in capsys.readouterr().err


def test_labels_are_dropped_as_in_training_and_a_dropped_label_gets_the_unguided_target():
    teacher, _ = tiny_teacher(num_classes=4)
    cfg = config.get_config("demo", **{**TINY, "num_classes": 4, "cond_drop_prob": 0.0})
    always, never = create_diffusion(cfg), create_diffusion(cfg)
    always.cond_drop_prob = 1.0  # every label dropped (a config allows less than 1)
    generator = torch.Generator().manual_seed(2)
    x0, noise = torch.rand(4, 3, 16, 16, generator=generator) * 2 - 1, torch.randn(4, 3, 16, 16, generator=generator)
    y, index = torch.tensor([0, 1, 2, 3]), torch.tensor([0, 1, 2, 3])
    dropped = ProgressiveDistillation(always, teacher, 4, 3.0).training_loss(teacher, x0, y, index, noise)
    null = torch.full((4,), 4)  # the null label: guidance leaves the unconditional prediction as it is
    unguided = ProgressiveDistillation(never, teacher, 4, 1.0).training_loss(teacher, x0, null, index, noise)
    kept = ProgressiveDistillation(never, teacher, 4, 3.0).training_loss(teacher, x0, y, index, noise)
    torch.testing.assert_close(dropped, unguided)
    assert not torch.allclose(kept, dropped)


def test_a_distillation_round_resumes_only_with_its_teacher_steps_and_guidance(capsys):
    tiny_checkpoint("labelled", num_classes=4, seed=0)
    flags = ["--preset", "demo", "--teacher", "checkpoints/labelled/last.pt", "--student-steps", "2",
             "--distill-guidance", "3", "--run-name", "round", *TRAIN_FLAGS]
    train.main([*flags, "--max-steps", "1"])
    capsys.readouterr()
    with pytest.raises(SystemExit) as exit:
        train.main([*flags, "--max-steps", "2", "--distill-guidance", "5"])  # the last value of a flag counts
    assert exit.value.code != 0 and "--distill-guidance 5.0 differs from the 3.0" in capsys.readouterr().err


def test_a_resume_cannot_turn_a_run_into_a_distillation_and_keeps_a_teacher_typed_another_way(capsys):
    # A plain run resumed with --teacher would become a student of it mid-way, from its own weights: refused.
    flags = ["--preset", "demo", "--run-name", "plain", *TRAIN_FLAGS]
    train.main([*flags, "--max-steps", "1"])
    capsys.readouterr()
    with pytest.raises(SystemExit) as exit:
        train.main([*flags, "--max-steps", "2", "--teacher", "checkpoints/teacher/last.pt", "--student-steps", "2"])
    assert exit.value.code != 0 and "--teacher checkpoints/teacher/last.pt differs" in capsys.readouterr().err
    # A round resumed with its teacher's path written another way resumes.
    round_flags = ["--preset", "demo", "--student-steps", "2", "--run-name", "round", *TRAIN_FLAGS]
    train.main([*round_flags, "--teacher", "checkpoints/teacher/last.pt", "--max-steps", "1"])
    train.main([*round_flags, "--teacher", str(Path("checkpoints/teacher/last.pt").resolve()), "--max-steps", "2"])
    assert weights("round")["step"] == 2


@pytest.mark.parametrize("num_classes", [0, 4])
def test_output_distillation_learns_the_teachers_prediction_at_the_same_draws(num_classes):
    teacher, diffusion = tiny_teacher("v", num_classes)
    student, _ = tiny_teacher("v", num_classes)
    with torch.no_grad():
        for parameter in student.parameters():
            parameter.add_(0.01 * torch.randn_like(parameter))
    objective = OutputDistillation(diffusion, teacher)
    x0 = torch.rand(6, 3, 16, 16) * 2 - 1
    y = torch.arange(6) % 4 if num_classes else None
    t = torch.tensor([0, 3, 7, 11, 15, 19])
    noise = torch.randn(6, 3, 16, 16)
    assert objective.training_loss(teacher, x0, y, t, noise).item() == 0  # the teacher itself: nothing to learn
    torch.manual_seed(5)  # the same label dropout in both
    loss = objective.training_loss(student, x0, y, t, noise)
    # By hand: the min-SNR weight times the squared difference of the two outputs at the same x_t and labels.
    torch.manual_seed(5)
    if num_classes:
        drop = torch.rand(6) < diffusion.cond_drop_prob
        y = torch.where(drop, torch.full_like(y, num_classes), y)
    x_t = diffusion.q_sample(x0, t, noise)
    with torch.no_grad():
        args = (x_t, t) if y is None else (x_t, t, y)
        mse = (student(*args) - teacher(*args)).pow(2).mean(dim=(1, 2, 3))
    weights = diffusion.loss_weights[t]
    torch.testing.assert_close(loss, (weights * mse).mean())
    assert loss.item() > 0
    assert objective.num_timesteps == diffusion.num_timesteps  # the rest passes through


def test_distill_from_trains_on_the_teachers_outputs_and_keeps_them_on_resume(capsys):
    tiny_checkpoint("student", 0, seed=1)  # the teacher's architecture and settings, other weights
    flags = [*TRAIN_FLAGS, "--init-from", "checkpoints/student/last.pt", "--distill-from",
             "checkpoints/teacher/last.pt", "--lr-schedule", "constant"]
    train.main([*flags, "--run-name", "straight", "--max-steps", "2"])
    train.main([*flags, "--run-name", "stopped", "--max-steps", "1"])
    train.main([*flags, "--run-name", "stopped", "--max-steps", "2"])
    straight = utils.load_checkpoint("checkpoints/straight/last.pt")
    resumed = utils.load_checkpoint("checkpoints/stopped/last.pt")
    assert straight["config"]["distill_from"] == "checkpoints/teacher/last.pt"
    for name, tensor in straight["model"].items():
        assert torch.equal(tensor, resumed["model"][name]), name
    capsys.readouterr()
    for extra, message in ((["--distill-from", "checkpoints/straight/last.pt"], "a run keeps what it learns from"),
                           (["--distill-from", ""], "a run keeps what it learns from")):
        with pytest.raises(SystemExit):
            train.main([*TRAIN_FLAGS, "--init-from", "checkpoints/student/last.pt", "--run-name", "stopped",
                        "--max-steps", "3", *extra])
        assert message in capsys.readouterr().err
    tiny_checkpoint("eps", 0, seed=1, objective="eps")
    with pytest.raises(SystemExit):
        train.main([*TRAIN_FLAGS, "--init-from", "checkpoints/student/last.pt", "--run-name", "other",
                    "--max-steps", "1", "--distill-from", "checkpoints/eps/last.pt"])
    err = capsys.readouterr().err
    assert "has objective 'eps' and this run 'v'" in err and "Traceback" not in err
