"""evaluate.py: the Frechet distance against its closed form, zero distance between identical image sets, the
Inception Score and KID against counts by hand, the whole pipeline from a checkpoint to results/metrics.csv (with
classifier-free guidance too), and one sentence for bad input or a machine without network.

Nothing is downloaded. A tiny feature extractor (a fixed random conv net) stands in for Inception and 200 images of
the built-in shapes stand in for CIFAR-10; both are registered with torch-fidelity's own API, as a user would
register theirs, and chosen with --feature-extractor and --reference. Each test works in its own temporary folder
with a tiny hand-made checkpoint `uncond` (16x16, T = 20).
"""

import csv
import inspect
import json
import urllib.error
from pathlib import Path

import imageio.v3 as iio
import numpy as np
import pytest
import torch
import torch_fidelity
from torch import nn
from torch_fidelity.metric_fid import KEY_METRIC_FID, fid_features_to_statistics, fid_statistics_to_metric

import diffusion
import evaluate
import inference
import utils
from dataset import make_shapes
from conftest import tiny_checkpoint
from diffusion import create_diffusion

EXTRACTOR = "tiny-conv"
REFERENCE = "shapes-16px"
FAST_METRICS = ["--feature-extractor", EXTRACTOR, "--reference", REFERENCE, "--device", "cpu"]


class TinyFeatures(torch_fidelity.FeatureExtractorBase):
    """Inception's stand-in: a fixed random 3x3 conv, ReLU and global average pooling give 8 'pool' features
    (for FID and KID), and a linear layer on them 10 'logits' (for the Inception Score).

    Only 8 features: numpy's BLAS uses threads from 200 x 16 matrices on, which on a few busy cores makes KID's
    100 kernel matrices take seconds instead of milliseconds."""

    def __init__(self, name, features_list, **kwargs):  # kwargs: the options calculate_metrics passes to every one
        super().__init__(name, features_list)
        self.conv = nn.Conv2d(3, 8, 3, stride=2)
        self.head = nn.Linear(8, 10)
        generator = torch.Generator().manual_seed(0)
        with torch.no_grad():
            for parameter in self.parameters():
                parameter.normal_(0, 0.5, generator=generator)
            # Confident logits: the shapes then score an IS of 2.0 rather than 1.06, far from the floor of 1 that
            # near-uniform p(y|x) give whatever the splits, so a wrong split or softmax changes the score visibly.
            self.head.weight.mul_(10)

    @staticmethod
    def get_provided_features_list():
        return ("pool", "logits")

    @staticmethod
    def get_default_feature_layer_for_metric(metric):
        return "logits" if metric == "isc" else "pool"

    @staticmethod
    def can_be_compiled():
        return False

    @staticmethod
    def get_dummy_input_for_compile():
        return torch.zeros(1, 3, 16, 16, dtype=torch.uint8)

    def forward(self, x):
        pool = torch.relu(self.conv(x.float() / 127.5 - 1)).mean(dim=(2, 3))  # uint8 (B, 3, H, W) -> (B, 8)
        features = {"pool": pool, "logits": self.head(pool)}
        return tuple(features[name] for name in self.features_list)


def reference_images():
    """The stand-in for CIFAR-10: 200 shapes, uint8 (200, 16, 16, 3)."""
    images, _ = make_shapes(200, image_size=16, seed=5)
    return images.permute(0, 2, 3, 1).numpy()


def inception_score_by_hand(images, splits=10):
    """(mean, std) over `splits` splits of the Inception Score of uint8 images (N, H, W, 3), with TinyFeatures'
    logits standing in for Inception's: for each split, IS = exp(mean_x KL(p(y|x) || p(y))), where p(y|x) is the
    softmax of an image's logits and p(y) the mean of p(y|x) over the split.

    torch-fidelity's conventions (metric_isc.py), which a score from one split or unshuffled splits would break:
    the images are shuffled by np.random.RandomState(2020).permutation before being cut into 10 consecutive splits,
    and the std is numpy's population std (ddof 0) of the 10 scores."""
    with torch.no_grad():
        logits = TinyFeatures(EXTRACTOR, ["logits"])(torch.from_numpy(images).permute(0, 3, 1, 2))[0]
    logits = logits.double().numpy()
    logits = logits[np.random.RandomState(2020).permutation(len(logits))]
    p_y_given_x = np.exp(logits - logits.max(axis=1, keepdims=True))
    p_y_given_x /= p_y_given_x.sum(axis=1, keepdims=True)  # (N, 10)
    scores = []
    for split in np.split(p_y_given_x, splits):  # N is a multiple of 10 in these tests: equal splits
        p_y = split.mean(axis=0, keepdims=True)  # (1, 10)
        kl = (split * (np.log(split) - np.log(p_y))).sum(axis=1)  # KL(p(y|x) || p(y)) of each image
        scores.append(np.exp(kl.mean()))
    return np.mean(scores), np.std(scores)


torch_fidelity.register_feature_extractor(EXTRACTOR, TinyFeatures)
torch_fidelity.register_dataset(REFERENCE, lambda root, download: evaluate.ImageArray(reference_images()))


@pytest.fixture(autouse=True)
def workdir(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    tiny_checkpoint("uncond", step=7)
    yield tmp_path


def run_evaluate(*flags):
    """Run evaluate.main in-process; returns the exit code (0 when it returned normally)."""
    try:
        evaluate.main([str(flag) for flag in flags])
    except SystemExit as exit:
        return exit.code or 0
    return 0


def results(run):
    """(results/metrics/RUN.json as a dict, the rows of results/metrics.csv as dicts, the CSV's header)."""
    record = json.loads(Path(f"results/metrics/{run}.json").read_text())
    with open("results/metrics.csv", newline="") as f:
        reader = csv.DictReader(f)
        rows = list(reader)
    return record, rows, reader.fieldnames


# --- the Frechet distance -----------------------------------------------------------------------------------

def torch_fidelity_fid(mu1, sigma1, mu2, sigma2):
    """The FID torch-fidelity computes from two Gaussians' statistics, as evaluate.py gets it."""
    return fid_statistics_to_metric({"mu": mu1, "sigma": sigma1}, {"mu": mu2, "sigma": sigma2}, False)[KEY_METRIC_FID]


def symmetric_sqrt(matrix):
    """The symmetric square root of a symmetric positive semi-definite matrix, from its eigendecomposition."""
    eigenvalues, eigenvectors = np.linalg.eigh(matrix)
    return eigenvectors @ np.diag(np.sqrt(eigenvalues.clip(min=0))) @ eigenvectors.T


def test_frechet_distance_matches_the_closed_form_for_commuting_covariances():
    # When Sigma_1 and Sigma_2 share eigenvectors, (Sigma_1 Sigma_2)^(1/2) has eigenvalues sqrt(s1 s2), so
    # FID = ||mu_1 - mu_2||^2 + sum_i (sqrt(s1_i) - sqrt(s2_i))^2.
    rng = np.random.default_rng(0)
    dim = 8
    mu1 = rng.normal(size=dim)
    mu2 = rng.normal(size=dim)
    s1 = rng.uniform(0.1, 3, size=dim)
    s2 = rng.uniform(0.1, 3, size=dim)
    expected = np.sum((mu1 - mu2) ** 2) + np.sum((np.sqrt(s1) - np.sqrt(s2)) ** 2)
    rotation, _ = np.linalg.qr(rng.normal(size=(dim, dim)))  # a random orthonormal basis
    for basis in (np.eye(dim), rotation):  # diagonal covariances, then the same ones rotated
        sigma1 = basis @ np.diag(s1) @ basis.T
        sigma2 = basis @ np.diag(s2) @ basis.T
        assert torch_fidelity_fid(mu1, sigma1, mu2, sigma2) == pytest.approx(expected, rel=1e-9)
    assert torch_fidelity_fid(mu1, sigma1, mu1, sigma1) == pytest.approx(0, abs=1e-9)


def test_frechet_distance_of_random_gaussians_matches_the_general_formula():
    # Non-commuting covariances: Tr((Sigma_1 Sigma_2)^(1/2)) = Tr((Sigma_1^(1/2) Sigma_2 Sigma_1^(1/2))^(1/2)).
    rng = np.random.default_rng(1)
    dim = 6
    mu1 = rng.normal(size=dim)
    mu2 = rng.normal(size=dim)
    mix1 = rng.normal(size=(dim, dim))
    mix2 = rng.normal(size=(dim, dim))

    def general_formula(mu1, sigma1, mu2, sigma2):
        root1 = symmetric_sqrt(sigma1)
        cross = np.trace(symmetric_sqrt(root1 @ sigma2 @ root1))
        return np.sum((mu1 - mu2) ** 2) + np.trace(sigma1) + np.trace(sigma2) - 2 * cross

    # Features drawn from N(mu, A A^T), and their empirical statistics as torch-fidelity computes them.
    features1 = torch.from_numpy(mu1 + rng.normal(size=(50_000, dim)) @ mix1.T)
    features2 = torch.from_numpy(mu2 + rng.normal(size=(50_000, dim)) @ mix2.T)
    stats1 = fid_features_to_statistics(features1)
    stats2 = fid_features_to_statistics(features2)
    empirical = torch_fidelity_fid(stats1["mu"], stats1["sigma"], stats2["mu"], stats2["sigma"])
    assert empirical == pytest.approx(general_formula(stats1["mu"], stats1["sigma"], stats2["mu"], stats2["sigma"]),
                                      rel=1e-9)
    # and, up to the sampling error of 50,000 draws, the distance between the true Gaussians
    assert empirical == pytest.approx(general_formula(mu1, mix1 @ mix1.T, mu2, mix2 @ mix2.T), rel=0.02)


# --- scoring image sets -------------------------------------------------------------------------------------

def test_samples_equal_to_the_reference_score_zero_and_noise_scores_worse():
    np.savez("reference.npz", arr_0=reference_images())
    folder = Path("reference_pngs")
    folder.mkdir()
    for index, picture in enumerate(reference_images()):
        iio.imwrite(folder / f"{index:06d}.png", picture)
    noise = np.random.default_rng(0).integers(0, 256, (200, 16, 16, 3), dtype=np.uint8)
    np.savez("noise.npz", arr_0=noise)

    scores = {}
    for samples in ("reference.npz", "reference_pngs", "noise.npz"):
        assert run_evaluate("--samples", samples, *FAST_METRICS) == 0
        scores[samples], _, _ = results(Path(samples).stem)
    # KID of a set against itself is not exactly 0: each of its subsets holds all m = 200 images, and the unbiased
    # MMD^2 of a set with itself is 2 (mean of k(x, y) over pairs x != y - mean of k(x, x)) / m, which -> 0 as m grows.
    images = torch.from_numpy(reference_images()).permute(0, 3, 1, 2)
    with torch.no_grad():
        features = TinyFeatures(EXTRACTOR, ["pool"])(images)[0].double().numpy()
    kernel = (features @ features.T / features.shape[1] + 1) ** 3  # torch-fidelity's polynomial kernel
    m = len(kernel)
    pairs_mean = (kernel.sum() - np.trace(kernel)) / (m * (m - 1))
    kid_of_itself = 2 * (pairs_mean - np.trace(kernel) / m) / m

    noise_scores = scores.pop("noise.npz")
    for same in scores.values():  # the reference's own pixels, as an npz and as PNG files
        assert same["fid"] == pytest.approx(0, abs=1e-6)
        assert same["kid"] == pytest.approx(kid_of_itself, rel=1e-3)
    assert noise_scores["fid"] > 1 and noise_scores["kid"] > 10 * abs(kid_of_itself)
    assert scores["reference.npz"]["num_samples"] == 200 and scores["reference.npz"]["kid_subset_size"] == 200
    # The Inception Score, by hand: 10 splits of 20 images, the same from the npz and from the PNG files.
    isc, isc_std = inception_score_by_hand(reference_images())
    for same in scores.values():
        assert same["isc"] == pytest.approx(isc, rel=1e-6) and same["isc_std"] == pytest.approx(isc_std, rel=1e-5)


def test_a_checkpoint_is_sampled_scored_and_logged(capsys):
    flags = ["--run-name", "uncond", "--num-samples", 40, "--steps", 4, "--batch-size", 16, "--metrics", "fid,isc,kid",
             *FAST_METRICS]
    assert run_evaluate(*flags) == 0

    # The samples: the EMA weights' DDIM samples of seed 0, saved where --samples can find them again.
    npz = Path("results/images/uncond/eval_ddim_4steps_40.npz")
    assert str(npz) in capsys.readouterr().out
    with np.load(npz) as data:
        images = data["arr_0"]
    path = Path("checkpoints/uncond/last.pt")
    model, cfg = inference.load_model_from_checkpoint(path, utils.load_checkpoint(path), use_ema=True)
    model = inference.prepare_for_sampling(model, torch.device("cpu"))
    opts = inference.SamplingOptions(sampler="ddim", steps=4, seed=0)
    expected = inference.generate(model, create_diffusion(cfg), cfg, opts, 40, device=torch.device("cpu"),
                                  batch_size=16)
    np.testing.assert_array_equal(images, utils.to_uint8(expected))

    record, rows, header = results("uncond")
    assert header == list(evaluate.CSV_COLUMNS)
    assert {key: record[key] for key in ("run", "step", "sampler", "steps", "guidance", "num_samples")} == \
        {"run": "uncond", "step": 7, "sampler": "ddim", "steps": 4, "guidance": 1.0, "num_samples": 40}
    assert record["fid"] > 0 and record["kid_subset_size"] == 40
    # The Inception Score and its std over 10 splits of 4 images, by hand from the same samples' logits.
    isc, isc_std = inception_score_by_hand(images)
    assert record["isc"] == pytest.approx(isc, rel=1e-6)
    assert record["isc_std"] == pytest.approx(isc_std, rel=1e-5)
    assert record["samples"] == str(npz) and record["reference"] == REFERENCE and record["seconds"] > 0
    assert len(rows) == 1
    for key in ("fid", "isc", "kid", "seconds"):
        assert float(rows[0][key]) == record[key]  # the CSV holds the JSON's numbers, unrounded

    # Scoring the saved samples again gives the same numbers, and the row keeps how they were made.
    assert run_evaluate("--samples", npz, "--metrics", "fid,kid", *FAST_METRICS) == 0
    again, rows, _ = results("uncond")
    assert again["fid"] == record["fid"] and again["kid"] == record["kid"] and again["isc"] is None
    assert len(rows) == 2 and rows[1]["isc"] == "" and rows[1]["steps"] == "4" and rows[1]["step"] == "7"


def test_compile_and_amp_reach_prepare_for_sampling(monkeypatch):
    seen = []
    prepare = inference.prepare_for_sampling
    monkeypatch.setattr(inference, "prepare_for_sampling", lambda model, device, amp_dtype, compile:
                        seen.append((amp_dtype, compile)) or prepare(model, device, amp_dtype))
    flags = ["--run-name", "uncond", "--num-samples", 10, "--steps", 2, "--metrics", "fid", *FAST_METRICS]
    assert run_evaluate(*flags, "--amp", "bf16", "--compile") == 0
    assert seen == [(torch.bfloat16, True)]


def test_ddpm_variance_and_dynamic_threshold_reach_the_sampler_and_name_the_samples(monkeypatch):
    seen = []
    original = diffusion.GaussianDiffusion.sample

    def recording(self, *args, **kwargs):
        seen.append((kwargs["ddpm_variance"], kwargs["dynamic_threshold"]))
        return original(self, *args, **kwargs)

    monkeypatch.setattr(diffusion.GaussianDiffusion, "sample", recording)
    flags = ["--run-name", "uncond", "--num-samples", 10, "--sampler", "ddpm", "--steps", 2, "--metrics", "fid",
             *FAST_METRICS]
    assert run_evaluate(*flags, "--ddpm-variance", "large", "--dynamic-threshold", "0.99") == 0
    assert seen == [("large", 0.99)]
    record, _, _ = results("uncond")
    assert record["ddpm_variance"] == "large" and record["dynamic_threshold"] == 0.99
    assert Path(record["samples"]).name == "eval_ddpm_2steps_10_large_dt0.99.npz"


def test_guidance_samples_every_class_equally_and_reaches_the_sampler(monkeypatch):
    # A model trained with 4 labels, sampled at w = 3 and then w = 1 with the same seed. 12 images in batches of 5
    # (not a multiple of 4): labels that restarted at 0 in every batch would show.
    tiny_checkpoint("cond", num_classes=4, step=3)
    seen = []  # (labels y, guidance scale w) of every call of the sampler
    sample = diffusion.GaussianDiffusion.sample

    def recording_sample(self, *args, **kwargs):
        arguments = inspect.signature(sample).bind(self, *args, **kwargs).arguments
        labels = arguments.get("y")
        seen.append((None if labels is None else labels.clone(), arguments.get("guidance_scale", 1.0)))
        return sample(self, *args, **kwargs)

    monkeypatch.setattr(diffusion.GaussianDiffusion, "sample", recording_sample)
    flags = ["--run-name", "cond", "--num-samples", 12, "--steps", 2, "--batch-size", 5, "--metrics", "isc",
             *FAST_METRICS]
    every_class = torch.arange(12) % 4  # 0, 1, 2, 3, 0, 1, ...: each class 3 times, as evaluate.py promises

    images = {}
    for scale in (3, 1):
        seen.clear()
        assert run_evaluate(*flags, "--guidance-scale", scale) == 0
        assert [w for _, w in seen] == [scale] * 3  # three batches, all guided at the scale asked for
        assert all(labels is not None for labels, _ in seen)
        labels = torch.cat([labels for labels, _ in seen])
        assert torch.equal(labels, every_class) and torch.bincount(labels).tolist() == [3, 3, 3, 3]
        record, _, _ = results("cond")  # replaced by each evaluation: read it before the next
        assert record["guidance"] == scale and record["run"] == "cond" and record["step"] == 3
        npz = Path("results/images/cond/eval_ddim_2steps_12" + ("_w3" if scale == 3 else "") + ".npz")
        assert record["samples"] == str(npz)
        with np.load(npz) as data:
            images[scale] = data["arr_0"]

    # The CSV keeps both evaluations, each with its own guidance.
    _, rows, _ = results("cond")
    assert [float(row["guidance"]) for row in rows] == [3.0, 1.0]
    # The guided samples are the EMA model's own DDIM chain at w = 3 with those labels, image i's noise drawn from
    # its own generator (as inference.generate draws it); and guidance changes them.
    path = Path("checkpoints/cond/last.pt")
    model, cfg = inference.load_model_from_checkpoint(path, utils.load_checkpoint(path), use_ema=True)
    model = inference.prepare_for_sampling(model, torch.device("cpu"))
    expected = []
    for start in (0, 5, 10):
        shape = (min(5, 12 - start), 3, 16, 16)
        generator = [torch.Generator().manual_seed(inference.image_seed(0, index))
                     for index in range(start, start + shape[0])]
        x_T = torch.stack([torch.randn(shape[1:], generator=row) for row in generator])
        with torch.no_grad():
            expected.append(sample(create_diffusion(cfg), model, shape, "ddim", 2, generator=generator,
                                   y=every_class[start:start + 5], guidance_scale=3, x_T=x_T))
    np.testing.assert_array_equal(images[3], utils.to_uint8(torch.cat(expected)))
    assert np.mean(images[3] != images[1]) > 0.5  # most pixels move under guidance (93% here); a few by chance not


# --- without network: one sentence saying what to download --------------------------------------------------

def no_network(*args, **kwargs):
    raise urllib.error.URLError("[Errno -3] Temporary failure in name resolution")


def one_error_line(capsys):
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "Traceback" not in err and len(err.strip().splitlines()) == 1
    return err


def test_without_network_or_inception_weights_says_what_to_download(monkeypatch, capsys):
    monkeypatch.setattr(torch.hub, "download_url_to_file", no_network)
    np.savez("reference.npz", arr_0=reference_images())
    assert run_evaluate("--samples", "reference.npz", "--reference", REFERENCE, "--device", "cpu") != 0
    err = one_error_line(capsys)
    assert evaluate.URL_INCEPTION_V3 in err and "data/" in err and "--inception-weights" in err
    assert not Path("data", evaluate.INCEPTION_FILE).exists()


def test_without_network_or_cifar10_says_where_to_put_it(monkeypatch, capsys):
    monkeypatch.setattr("torchvision.datasets.cifar.download_and_extract_archive", no_network)
    np.savez("reference.npz", arr_0=reference_images())
    assert run_evaluate("--samples", "reference.npz", "--feature-extractor", EXTRACTOR, "--device", "cpu") != 0
    err = one_error_line(capsys)
    assert "cifar-10-python.tar.gz" in err and "into the folder data/" in err


# --- bad input: one sentence and a non-zero exit ------------------------------------------------------------

BAD_INPUTS = {
    "unknown metric": (["--samples", "reference.npz", "--metrics", "fid,lpips"], "unknown metric 'lpips'"),
    "missing samples": (["--samples", "missing.npz"], "--samples missing.npz does not exist"),
    "channels first": (["--samples", "channels_first.npz"], "arr_0 in channels_first.npz is uint8 of shape "
                                                            "(12, 3, 16, 16), but must be uint8 images (N, H, W, 3)"),
    "float images": (["--samples", "floats.npz"], "arr_0 in floats.npz is float32"),
    "not an npz": (["--samples", "text.npz"], "cannot read text.npz as an .npz file with an arr_0 array"),
    "folder without images": (["--samples", "empty"], "the folder empty must hold PNG or JPEG images"),
    "unknown run": (["--run-name", "nope"], "run 'nope' has no checkpoint in checkpoints/nope (runs with "
                                            "checkpoints: uncond)"),
    "missing checkpoint": (["--checkpoint", "missing.pt"], "checkpoint missing.pt does not exist"),
    "too many steps": (["--run-name", "uncond", "--steps", "21"], "--steps 21 is more than the model's 20 timesteps"),
    "guidance unconditional": (["--run-name", "uncond", "--guidance-scale", "3"], "needs a model trained with labels"),
    "too few samples": (["--run-name", "uncond", "--num-samples", "5"], "--num-samples must be at least 10"),
    "two sources": (["--samples", "reference.npz", "--checkpoint", "x.pt"], "give only one of --samples"),
    "unknown reference": (["--samples", "reference.npz", "--reference", "imagenet"], "unknown --reference 'imagenet'"),
    "wrong weights file": (["--samples", "reference.npz", "--feature-extractor", evaluate.INCEPTION,
                            "--inception-weights", "text.npz"], "text.npz does not hold Inception's weights"),
}


@pytest.mark.parametrize("case", BAD_INPUTS)
def test_bad_input_gets_one_sentence_and_a_non_zero_exit(case, capsys):
    flags, message = BAD_INPUTS[case]
    np.savez("reference.npz", arr_0=reference_images())
    np.savez("channels_first.npz", arr_0=np.zeros((12, 3, 16, 16), dtype=np.uint8))
    np.savez("floats.npz", arr_0=np.zeros((12, 16, 16, 3), dtype=np.float32))
    Path("text.npz").write_text("not an npz file")
    Path("empty").mkdir()
    assert run_evaluate(*FAST_METRICS, *flags) != 0
    assert message in one_error_line(capsys)
