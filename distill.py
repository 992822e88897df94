"""Progressive distillation (Salimans & Ho 2022): halve a model's sampling steps, round after round.

    python distill.py --teacher demo                          # rounds of 500 steps: 32, 16, 8, 4, 2, 1 DDIM steps
    python distill.py --teacher demo --start-steps 8 --end-steps 2 --steps-per-round 1000 --batch-size 64
    python sample.py --run-name demo-pd4                      # the 4-step student samples in 4 steps by default
    python evaluate.py --run-name demo-pd4 --num-samples 1000

Round N trains a student to do in one DDIM step what its teacher does in two: the first teacher is the run's EMA
model sampled with 2 x start-steps DDIM steps, and each student teaches the next round (distillation.py has the
formulas). Every round is an ordinary train.py run named TEACHER-pdN (checkpoints/TEACHER-pdN/, TensorBoard in
results/logs/TEACHER-pdN/, preview grids sampled in N steps), started from its teacher's EMA weights: a stopped
round resumes exactly when distill.py runs again, and finished rounds are skipped. Flags this script does not know
go to every round's train.py (--batch-size, --amp, --device, --ema-decay, --save-every, ...).
"""

import argparse
from dataclasses import dataclass

import config
import inference
import train
import utils
from config import flag_field


@dataclass
class DistillOptions:
    """The rounds of a progressive distillation. Every field is a --flag of the same name (see --help)."""

    teacher: str = flag_field("", "the run to distil (its newest checkpoint), or a checkpoint file")
    start_steps: int = flag_field(32, "the first student's DDIM steps (its teacher takes twice as many; default 32)")
    end_steps: int = flag_field(1, "the last student's DDIM steps (default 1)")
    steps_per_round: int = flag_field(500, "optimizer steps of each round (default 500)")
    lr: float = flag_field(1e-4, "peak learning rate of each round, annealed to 0 by the cosine schedule (1e-4)")
    run_name: str = flag_field("", "rounds are named RUN-pdN (default RUN: the teacher's run name)")


def parse_options(argv=None):
    """(DistillOptions, the flags left for train.py)."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    config.add_dataclass_flags(parser, DistillOptions, "options")
    args, train_flags = parser.parse_known_args(argv)
    typed = {name: value for name, value in vars(args).items() if value is not None}
    return DistillOptions(**typed), train_flags


def round_steps(opts):
    """The student step counts of the rounds: start_steps, start_steps / 2, ..., end_steps."""
    counts = []
    steps = opts.start_steps
    while steps >= opts.end_steps:
        counts.append(steps)
        steps //= 2
    return counts


def check_options(opts, teacher_cfg):
    """Raise UsageError for rounds that cannot work."""
    if not opts.teacher:
        raise utils.UsageError("give the run to distil with --teacher RUN (or a checkpoint file)")
    if opts.steps_per_round < 1 or opts.lr <= 0:
        raise utils.UsageError(f"--steps-per-round must be at least 1 and --lr positive, got {opts.steps_per_round} "
                               f"and {opts.lr}")
    start, end = opts.start_steps, opts.end_steps
    if not (1 <= end <= start and start & (start - 1) == 0 and end & (end - 1) == 0):
        raise utils.UsageError(f"--start-steps and --end-steps must be powers of two with 1 <= end <= start (each "
                               f"round halves the steps), got {start} and {end}")
    if 2 * start > teacher_cfg.timesteps:
        raise utils.UsageError(f"--start-steps {start} needs a teacher of at least {2 * start} timesteps; this one has "
                               f"{teacher_cfg.timesteps}")


def teacher_checkpoint(name):
    """(path, config) of --teacher: a checkpoint file, or a run's newest checkpoint."""
    path, state = (name, utils.load_checkpoint(name)) if name.endswith(".pt") else inference.find_run_checkpoint(name)
    return path, config.config_from_dict(state["config"])


def main(argv=None):
    opts, train_flags = parse_options(argv)
    try:
        if not opts.teacher:
            raise utils.UsageError("give the run to distil with --teacher RUN (or a checkpoint file)")
        teacher_path, teacher_cfg = teacher_checkpoint(opts.teacher)
        check_options(opts, teacher_cfg)
    except config.UserError as error:
        config.fail(error)
    prefix = opts.run_name or teacher_cfg.name
    for steps in round_steps(opts):
        run = f"{prefix}-pd{steps}"
        if utils.finished_step(run) >= opts.steps_per_round:
            print(f"round {run}: done before, skipped")
        else:
            print(f"round {run}: {steps} DDIM step(s) learn what {2 * steps} of {teacher_path} do")
            train.main(["--preset", teacher_cfg.preset, "--teacher", str(teacher_path), "--student-steps", str(steps),
                        "--run-name", run, "--max-steps", str(opts.steps_per_round), "--lr", str(opts.lr),
                        "--warmup-steps", "0", *train_flags])
            if utils.finished_step(run) < opts.steps_per_round:  # stopped by a signal: train.py saved and said so
                config.fail(f"round {run} stopped before its {opts.steps_per_round} steps; run the same command "
                            f"again to resume it")
        teacher_path = utils.CHECKPOINT_DIR / run / "last.pt"
    print(f"done: the last student is {teacher_path}; try python sample.py --run-name {prefix}-pd{opts.end_steps}")


if __name__ == "__main__":
    main()
