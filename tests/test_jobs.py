"""jobs.py: sampling shared out among torchrun processes (2 gloo processes here) gives the images of one process bit
for bit; a stopped job keeps its batches and goes on to the same output; a job with other settings is refused.

Each test works in its own temporary folder with a tiny hand-made checkpoint (16x16, T = 20), as test_sample.py.
"""

import dataclasses
import json
import os
import re
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import evaluate
import inference
import jobs
import utils
import test_evaluate  # noqa: F401 (registers the tiny Inception stand-in and reference with torch-fidelity)
from conftest import tiny_checkpoint
from diffusion import create_diffusion
from test_sample import run_sample

REPO = Path(__file__).resolve().parents[1]
# 7 images in batches of 2: 4 batches, the last one short; 2 processes make them in 2 rounds. DDPM draws new noise
# at every step, so an image made from another generator's stream would show.
# --amp none: torchrun's processes do not see the tests' float32 CPU (conftest), and would take bf16 on a CPU with AMX.
JOB = ["--num-samples", "7", "--batch-size", "2", "--sampler", "ddpm", "--steps", "3", "--device", "cpu",
       "--amp", "none"]
UNFINISHED = Path("results/images/uncond/unfinished")
GENERATE_BATCH = inference.generate_batch


@pytest.fixture(autouse=True)
def checkpoint(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    return tiny_checkpoint("uncond", 0, seed=0)


def npz_images(path):
    with np.load(path) as data:
        return data["arr_0"]


def single_process_npz(*flags):
    """The job's images from one process, made without stopping, in a folder of their own."""
    assert run_sample("--run-name", "uncond", "--format", "npz", *JOB, "--out", "alone", *flags) == 0
    return npz_images(next(Path("alone").glob("*.npz")))


@pytest.fixture(autouse=True)
def sigint_as_in_a_terminal():
    """SIGINT handled as in a terminal (KeyboardInterrupt) in these tests: a shell starts a background job
    (`pytest ... &`, nohup) with SIGINT ignored and Python keeps that, so a one-round job, which puts back the
    handler it found, would then ignore the signal that stop_after_batches sends."""
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    yield
    signal.signal(signal.SIGINT, previous)


def stop_after_batches(monkeypatch, count):
    """Make the job get SIGINT during its batch number `count` (1-based), as Ctrl-C would."""
    made = []

    def interrupted(*args, **kwargs):
        made.append(args[4])  # start
        if len(made) == count:
            signal.raise_signal(signal.SIGINT)
        return GENERATE_BATCH(*args, **kwargs)

    monkeypatch.setattr(inference, "generate_batch", interrupted)
    return made


def torchrun(port, script, *flags):
    """Run `script` in 2 gloo processes in the working directory; returns the completed process."""
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", f"--master_port={port}",
               str(script), *[str(flag) for flag in flags]]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    return subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)


def test_every_sampler_gives_an_image_the_same_noise_in_any_batch():
    # Each image draws its noise from its own seed, so even the stochastic samplers make the same image whatever
    # batch (or process) it is made in.
    path = Path("checkpoints/uncond/last.pt")
    model, cfg = inference.load_model_from_checkpoint(path, torch.load(path, weights_only=True))
    diffusion = create_diffusion(cfg)
    for sampler, eta in (("ddpm", 0.0), ("ddim", 1.0), ("dpmpp2m", 0.0)):
        opts = inference.SamplingOptions(sampler=sampler, steps=3, eta=eta, seed=4)
        whole = inference.generate(model, diffusion, cfg, opts, 5, device=torch.device("cpu"), batch_size=5)
        split = inference.generate(model, diffusion, cfg, opts, 5, device=torch.device("cpu"), batch_size=2)
        # Up to rounding: a convolution's sums can run in another order for another batch size.
        torch.testing.assert_close(split, whole, atol=1e-3, rtol=0)
        # Images 2 and 3 as a batch of their own.
        alone = inference.generate_batch(model, diffusion, cfg, opts, 2, 2, device=torch.device("cpu"))
        torch.testing.assert_close(alone, whole[2:4], atol=1e-3, rtol=0)
        other_seed = inference.generate(model, diffusion, cfg, dataclasses.replace(opts, seed=5), 5,
                                        device=torch.device("cpu"), batch_size=5)
        assert (other_seed - whole).abs().mean() > 0.05


def test_a_stopped_job_keeps_its_batches_and_goes_on_to_the_same_images(monkeypatch, capsys):
    expected = single_process_npz()
    made = stop_after_batches(monkeypatch, 2)
    assert run_sample("--run-name", "uncond", "--format", "npz", *JOB) == 1
    err = capsys.readouterr().err
    assert "stopped by SIGINT: 4 of 7 images are kept" in err and "run the same command again" in err
    assert made == [0, 2]  # it stopped after the round it was in, and made nothing after it
    [folder] = UNFINISHED.iterdir()
    assert sorted(path.name for path in folder.iterdir()) == ["batch_000000.npy", "batch_000001.npy",
                                                             "settings.json"]
    assert not list(Path("results/images/uncond").glob("*.npz"))  # no output from a part of the job

    made = stop_after_batches(monkeypatch, 0)  # records the batches without stopping
    assert run_sample("--run-name", "uncond", "--format", "npz", *JOB) == 0
    assert "4 of 7 images were made before" in capsys.readouterr().out
    assert made == [4, 6]  # only the batches that were missing
    np.testing.assert_array_equal(npz_images(next(Path("results/images/uncond").glob("*.npz"))), expected)
    assert not UNFINISHED.exists()  # the kept batches go once the output is written


def test_a_job_with_other_settings_is_refused_and_keeps_its_batches(monkeypatch, capsys):
    stop_after_batches(monkeypatch, 1)
    assert run_sample("--run-name", "uncond", "--format", "npz", *JOB) == 1
    monkeypatch.setattr(inference, "generate_batch", GENERATE_BATCH)
    capsys.readouterr()
    [folder] = UNFINISHED.iterdir()
    kept = sorted(folder.iterdir())

    assert run_sample("--run-name", "uncond", "--format", "npz", *JOB, "--ddpm-variance", "small") == 0  # own job
    assert run_sample("--run-name", "uncond", "--format", "npz", *JOB, "--batch-size", "3") == 1
    err = capsys.readouterr().err
    assert f"{folder} holds 2 images of an unfinished job made with other settings (batch_size 2, now 3)" in err
    assert "delete that folder to start afresh (nothing was deleted)" in err
    # The same flags after a torch upgrade (its kernels may round otherwise): refused too.
    settings = json.loads((folder / "settings.json").read_text())
    (folder / "settings.json").write_text(json.dumps({**settings, "torch": "2.0.0"}))
    assert run_sample("--run-name", "uncond", "--format", "npz", *JOB) == 1
    assert f"(torch '2.0.0', now '{torch.__version__}')" in capsys.readouterr().err
    (folder / "settings.json").write_text(json.dumps(settings))
    kept = sorted(folder.iterdir())
    # A retrained model is another model, even under the same name and flags: a job of its own, which leaves this
    # one alone.
    shutil.rmtree("checkpoints/uncond")
    tiny_checkpoint("uncond", 0, seed=1)
    assert run_sample("--run-name", "uncond", "--format", "npz", *JOB) == 0
    assert sorted(folder.iterdir()) == kept and json.loads((folder / "settings.json").read_text())["batch_size"] == 2
    assert list(UNFINISHED.iterdir()) == [folder]


def test_a_damaged_batch_is_made_again_alone_and_a_one_round_job_stops_at_once(monkeypatch, capsys):
    expected = single_process_npz()
    stop_after_batches(monkeypatch, 3)
    assert run_sample("--run-name", "uncond", "--format", "npz", *JOB) == 1
    [folder] = UNFINISHED.iterdir()
    (folder / "batch_000001.npy").write_bytes(b"not an array")
    (folder / "batch_000002.npy").write_bytes(b"")  # as a full disk leaves it
    capsys.readouterr()
    made = stop_after_batches(monkeypatch, 0)
    assert run_sample("--run-name", "uncond", "--format", "npz", *JOB) == 0
    out = capsys.readouterr().out
    assert f"{folder / 'batch_000001.npy'} is damaged; it is made again" in out
    assert "2 of 7 images were made before" in out
    assert made == [2, 4, 6]  # batches 1 and 2 again, and batch 3; batch 0 was kept
    np.testing.assert_array_equal(npz_images(next(Path("results/images/uncond").glob("*.npz"))), expected)
    # A job of one batch keeps nothing, so Ctrl-C interrupts it at once rather than after the batch.
    stop_after_batches(monkeypatch, 1)
    with pytest.raises(KeyboardInterrupt):
        run_sample("--run-name", "uncond", "--format", "npz", "--num-samples", "2", "--batch-size", "2", "--steps", "2")


def test_two_processes_make_the_images_of_one_and_finish_a_stopped_job(monkeypatch, capsys):
    expected = single_process_npz()
    # Stopped in one process after its first batch, then finished by two.
    stop_after_batches(monkeypatch, 1)
    assert run_sample("--run-name", "uncond", "--format", "npz", *JOB) == 1
    result = torchrun(29561, REPO / "sample.py", "--run-name", "uncond", "--format", "npz", *JOB)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.count("wrote:") == 1  # one process writes the output
    assert "2 of 7 images were made before" in result.stdout
    np.testing.assert_array_equal(npz_images(next(Path("results/images/uncond").glob("*.npz"))), expected)
    assert not UNFINISHED.exists()

    # A job of two batches stopped after one, finished by two processes (one round: the first one's batch is
    # reused, the second made) and then cleaned up.
    short = ["--num-samples", "4", "--batch-size", "2", "--sampler", "ddpm", "--steps", "3", "--device", "cpu",
             "--amp", "none"]
    assert run_sample("--run-name", "uncond", "--format", "npz", *short, "--out", "short-one") == 0
    stop_after_batches(monkeypatch, 1)
    assert run_sample("--run-name", "uncond", "--format", "npz", *short, "--out", "short") == 1
    result = torchrun(29565, REPO / "sample.py", "--run-name", "uncond", "--format", "npz", *short, "--out", "short")
    assert result.returncode == 0, result.stderr[-3000:]
    assert "2 of 4 images were made before" in result.stdout and not Path("short/unfinished").exists()
    np.testing.assert_array_equal(npz_images(next(Path("short").glob("*.npz"))),
                                  npz_images(next(Path("short-one").glob("*.npz"))))

    # A whole job in two processes, straight through: the same images again, each process making its share (a
    # launcher notes which process makes which batch, each process in a file of its own: lines the two print to
    # one pipe can interleave mid-line when Python's output is unbuffered).
    launcher = Path("launch_sample.py")
    launcher.write_text(f"import os, sys\nsys.path.insert(0, {str(REPO)!r})\nimport inference, sample\n"
                        f"make = inference.generate_batch\n"
                        f"def reporting(*args, **kwargs):\n"
                        f"    with open('made_by_rank' + os.environ['RANK'], 'a') as f:\n"
                        f"        f.write(str(args[4]) + '\\n')\n"
                        f"    return make(*args, **kwargs)\n"
                        f"inference.generate_batch = reporting\nsample.main(sys.argv[1:])\n")
    result = torchrun(29562, launcher, "--run-name", "uncond", "--format", "npz", *JOB, "--out", "two")
    assert result.returncode == 0, result.stderr[-3000:]
    assert [Path(f"made_by_rank{rank}").read_text().split() for rank in (0, 1)] == [["0", "4"], ["2", "6"]]
    assert "7/7 images" in result.stderr
    np.testing.assert_array_equal(npz_images(next(Path("two").glob("*.npz"))), expected)


def test_two_processes_evaluate_into_one_metrics_row(tmp_path):
    # evaluate.py with the test suite's tiny Inception stand-in, registered by a launcher as a user would.
    launcher = tmp_path / "launch_evaluate.py"
    # It also reports which processes load the reference images: the first one alone should.
    launcher.write_text(f"import os, sys\nsys.path.insert(0, {str(REPO / 'tests')!r})\nimport test_evaluate\n"
                        f"import evaluate\nload = evaluate.load_reference\n"
                        f"def reporting(name):\n    print('reference loaded by rank', os.environ['RANK'])\n"
                        f"    return load(name)\n"
                        f"evaluate.load_reference = reporting\nevaluate.main(sys.argv[1:])\n")
    flags = ["--run-name", "uncond", "--num-samples", "10", "--batch-size", "4", "--steps", "2", "--metrics", "fid",
             "--feature-extractor", "tiny-conv", "--reference", "shapes-16px", "--device", "cpu", "--amp", "none"]
    result = torchrun(29563, launcher, *flags)
    assert result.returncode == 0, result.stderr[-3000:]
    assert re.findall(r"reference loaded by rank \d", result.stdout) == ["reference loaded by rank 0"]
    with open("results/metrics.csv") as f:
        assert len(f.readlines()) == 2  # the header and one row
    two = npz_images("results/images/uncond/eval_ddim_2steps_10.npz")
    evaluate.main(flags)  # one process
    one = npz_images("results/images/uncond/eval_ddim_2steps_10_1.npz")
    np.testing.assert_array_equal(two, one)
    with open("results/metrics.csv") as f:
        rows = f.readlines()[1:]
    assert len(rows) == 2 and rows[0].split(",")[6] == rows[1].split(",")[6]  # the same FID


def test_torchrun_refuses_what_runs_in_one_process():
    result = torchrun(29564, REPO / "sample.py", "--run-name", "uncond", "--gif", "--device", "cpu")
    assert result.returncode != 0
    assert result.stderr.count("error: --gif runs in one process") == 1  # one sentence, from the first process
    # torchrun reports the failed processes with a traceback of its own; none comes from our code.
    assert not re.search(rf'File "{REPO}/\w+\.py"', result.stderr)


def test_image_seeds_fit_the_generator_and_keep_jobs_of_other_seeds_apart():
    # PyTorch's CPU generator keeps 32 bits of its seed: a seed of 2^32 + i would give image i's noise again.
    starts = sorted(inference.image_seed(seed, 0) for seed in range(10_000))
    assert starts[-1] < 2 ** 32
    gaps = [b - a for a, b in zip(starts, starts[1:])] + [starts[0] + 2 ** 32 - starts[-1]]  # around the circle
    assert min(gaps) == 287_291  # as the docstring says: jobs of seeds 0 ... 9,999 never share an image below that
    first_draws = [torch.randn(1, generator=generator).item() for generator in inference.image_generators(3, 0, 4)]
    assert len(set(first_draws)) == 4


def test_fingerprint_follows_the_weights():
    model, _ = inference.load_model_from_checkpoint(Path("checkpoints/uncond/last.pt"),
                                                    torch.load("checkpoints/uncond/last.pt", weights_only=True))
    before = jobs.fingerprint(model)
    assert jobs.fingerprint(model.to(memory_format=torch.channels_last)) == before  # the layout is not the model
    with torch.no_grad():
        model.out_conv.bias[0] += 1e-6
    assert jobs.fingerprint(model) != before


def test_each_process_gets_its_own_gpu_and_more_processes_than_gpus_are_refused(monkeypatch):
    # Under torchrun with NCCL, a process's GPU is that of its LOCAL_RANK; two processes on one GPU would make NCCL
    # fail deep inside, so that is refused with a sentence. CPUs are not GPUs: --device cpu takes any number.
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setenv("LOCAL_RANK", "1")
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")
    monkeypatch.setenv("WORLD_SIZE", "8")  # 4 machines of 2 GPUs: what counts is the processes on this one
    assert utils.process_device(torch.device("cuda")) == torch.device("cuda")  # one process: no group, as given
    monkeypatch.setattr(torch.distributed, "is_initialized", lambda: True)
    assert utils.process_device(torch.device("cuda")) == torch.device("cuda", 1)
    assert utils.process_device(torch.device("cpu")) == torch.device("cpu")
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "3")
    with pytest.raises(utils.UsageError, match=r"started 3 processes on this machine, which has 2 GPU\(s\); start "
                                               r"one per GPU \(--nproc_per_node=2\), or use --device cpu"):
        utils.process_device(torch.device("cuda"))
    assert utils.process_device(torch.device("cpu")) == torch.device("cpu")


def test_more_processes_than_gpus_are_refused_in_one_sentence_by_train_and_sample():
    # Two torchrun processes on a machine that claims one GPU (a launcher fakes it; the group falls back to gloo).
    launcher = Path("launch_one_gpu.py")
    launcher.write_text(f"import runpy, sys\nsys.path.insert(0, {str(REPO)!r})\nimport torch\n"
                        f"torch.cuda.is_available = lambda: True\ntorch.cuda.device_count = lambda: 1\n"
                        f"script = sys.argv.pop(1)\nsys.argv[0] = script\nrunpy.run_path(script, run_name='__main__')\n")
    for port, script, flags in ((29566, "train.py", ["--preset", "demo", "--max-steps", "1", "--run-name", "refused"]),
                                (29567, "sample.py", ["--run-name", "uncond", "--num-samples", "2"])):
        result = torchrun(port, launcher, REPO / script, "--device", "cuda", "--amp", "none", *flags)
        assert result.returncode != 0
        assert result.stderr.count("error: torchrun started 2 processes on this machine, which has 1 GPU(s); "
                                   "start one per GPU (--nproc_per_node=1), or use --device cpu") == 1, \
            result.stderr[-3000:]
    assert not Path("checkpoints/refused").exists()
