"""The offline classifier metric (quality.py): the Frechet distance and class balance against closed forms, the
scores of real, degraded and random images in their calibrated order, the classifier cache (reused, retrained when
the data changes), and evaluate.py --metrics classifier from a checkpoint and from saved samples."""

import csv
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torch_fidelity.metric_fid import fid_statistics_to_metric

import config
import evaluate
import quality
from conftest import tiny_checkpoint
from dataset import make_shapes
from test_evaluate import run_evaluate


@pytest.fixture(autouse=True)
def workdir(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    yield tmp_path


# --- the formulas ---------------------------------------------------------------------------------------

def test_frechet_distance_matches_the_closed_form_for_diagonal_covariances():
    # Diagonal (so commuting) covariances: ||mu_1 - mu_2||^2 + sum_i (sqrt(a_i) - sqrt(b_i))^2.
    rng = np.random.default_rng(0)
    mu_1, mu_2 = rng.normal(size=6), rng.normal(size=6)
    a, b = rng.uniform(0.1, 3, size=6), rng.uniform(0.1, 3, size=6)
    expected = ((mu_1 - mu_2) ** 2).sum() + ((np.sqrt(a) - np.sqrt(b)) ** 2).sum()
    assert quality.frechet_distance(mu_1, np.diag(a), mu_2, np.diag(b)) == pytest.approx(expected, rel=1e-10)
    assert quality.frechet_distance(mu_1, np.diag(a), mu_1, np.diag(a)) == pytest.approx(0, abs=1e-10)


def test_frechet_distance_of_general_covariances_matches_torch_fidelity():
    rng = np.random.default_rng(1)
    features_1 = rng.normal(size=(300, 8)) @ rng.normal(size=(8, 8))
    features_2 = rng.normal(size=(300, 8)) @ rng.normal(size=(8, 8)) + 0.5
    mu_1, sigma_1 = quality.gaussian_stats(features_1)
    mu_2, sigma_2 = quality.gaussian_stats(features_2)
    expected = fid_statistics_to_metric({"mu": mu_1, "sigma": sigma_1}, {"mu": mu_2, "sigma": sigma_2},
                                        verbose=False)["frechet_inception_distance"]
    assert quality.frechet_distance(mu_1, sigma_1, mu_2, sigma_2) == pytest.approx(expected, rel=1e-6)
    np.testing.assert_allclose(sigma_1, np.cov(features_1.T))  # the N - 1 covariance, as torch-fidelity's


def test_class_balance_is_the_normalised_entropy_of_the_predictions():
    assert quality.class_balance(torch.arange(40) % 4, 4) == pytest.approx(1.0)
    assert quality.class_balance(torch.full((40,), 2), 4) == pytest.approx(0.0)
    predicted = torch.tensor([0] * 30 + [1] * 10)  # p = (3/4, 1/4, 0, 0)
    expected = -(0.75 * np.log(0.75) + 0.25 * np.log(0.25)) / np.log(4)
    assert quality.class_balance(predicted, 4) == pytest.approx(expected)


# --- a classifier of small shapes: real, degraded and random images ----------------------------------------

@pytest.fixture(scope="module")
def shapes_metric():
    """A QualityMetric of 16x16 shapes trained briefly, and held-out shapes with their labels."""
    train_images, train_labels = make_shapes(1600, image_size=16, seed=0)
    test_images, test_labels = make_shapes(400, image_size=16, seed=1)
    classifier = quality.train_classifier(train_images, train_labels, 4, epochs=1, min_steps=150, log=lambda _: None)
    features, _ = quality.run_classifier(classifier, train_images)
    mu, sigma = quality.gaussian_stats(features.numpy())
    metric = quality.QualityMetric(classifier, ["circle", "square", "triangle", "cross"], mu, sigma, None,
                                   train_images.shape[1:], "test")
    return metric, test_images, test_labels


def test_a_set_scored_against_its_own_statistics_has_distance_zero(shapes_metric):
    metric, test_images, _ = shapes_metric
    features, _ = quality.run_classifier(metric.classifier, test_images)
    mu, sigma = quality.gaussian_stats(features.numpy())
    same = quality.QualityMetric(metric.classifier, metric.class_names, mu, sigma, None, (3, 16, 16), "same")
    assert abs(same.score(test_images)["cfid"]) < 1e-6


def test_degraded_images_score_worse_than_real_ones_in_the_calibrated_order(shapes_metric):
    metric, test_images, test_labels = shapes_metric
    rows = quality.calibrate(metric, test_images, num_images=400)
    cfid = {how: scores["cfid"] for how, scores in rows.items()}
    for how in ("blur", "half_res", "noised"):
        assert cfid["real"] < 0.5 * cfid[how] < 0.5 * cfid["uniform_noise"], cfid
    assert rows["real"]["confident"] > 0.8 and rows["uniform_noise"]["confident"] < 0.1, rows
    assert rows["real"]["balance"] > 0.95

    # The class asked for: right for the real labels, wrong for labels shifted by one class.
    assert metric.score(test_images, test_labels)["accuracy"] > 0.9
    assert metric.score(test_images, (test_labels + 1) % 4)["accuracy"] < 0.1
    # One class only: balance 0, and far from the training set.
    circles = test_images[test_labels == 0]
    assert metric.score(circles)["balance"] < 0.1
    assert metric.score(circles)["cfid"] > 5 * cfid["real"]


def test_samples_as_sample_py_stores_them_score_as_the_classifier_layout(shapes_metric):
    metric, test_images, _ = shapes_metric
    stored = test_images.permute(0, 2, 3, 1).numpy()  # (N, H, W, 3), what the npz files hold
    assert metric.score(stored) == metric.score(test_images)
    with pytest.raises(quality.QualityError, match="16x16 pixels"):
        metric.score(np.zeros((20, 32, 32, 3), np.uint8))


# --- the cache ------------------------------------------------------------------------------------------

def write_folder(root, num_per_class=30, size=16):
    """Two classes of 16x16 grey pictures: a bright square on the left or on the right."""
    rng = np.random.default_rng(0)
    for label, name in enumerate(("left", "right")):
        (root / name).mkdir(parents=True)
        for index in range(num_per_class):
            pixels = rng.integers(0, 60, (size, size), dtype=np.uint8)
            columns = slice(1, 7) if label == 0 else slice(9, 15)
            pixels[4:12, columns] = 230
            Image.fromarray(pixels).save(root / name / f"{index:03d}.png")


def test_the_classifier_is_cached_and_retrained_when_the_images_change(monkeypatch, workdir):
    write_folder(workdir / "pics")
    trained = []
    real_train = quality.train_classifier

    def quick_train(images, labels, num_classes, **options):
        trained.append(len(images))
        return real_train(images, labels, num_classes, epochs=1, min_steps=20, log=lambda _: None)

    monkeypatch.setattr(quality, "train_classifier", quick_train)
    cfg = config.get_config("demo", dataset="folder", data_dir=str(workdir / "pics"), channels=1, image_size=16)
    first = quality.load_metric(cfg, log=lambda _: None)
    assert trained == [54]  # 60 images, every 10th held out
    files = sorted(quality.CLASSIFIER_DIR.glob("*.pt"))
    assert [path.name for path in files] == [f"folder-pics-16px-1ch-{first.key}.pt"]
    assert first.held_out_accuracy == 1.0  # the two classes are easy

    again = quality.load_metric(cfg, log=lambda _: None)
    assert trained == [54]  # loaded, not trained again
    images = quality.load_splits(cfg)[2]
    assert again.score(images) == first.score(images)

    Image.fromarray(np.full((16, 16), 255, np.uint8)).save(workdir / "pics" / "left" / "000.png")
    changed = quality.load_metric(cfg, log=lambda _: None)
    assert trained == [54, 54] and changed.key != first.key
    assert len(list(quality.CLASSIFIER_DIR.glob("*.pt"))) == 2


def test_a_dataset_without_two_classes_is_refused_in_one_sentence(workdir):
    write_folder(workdir / "pics")
    cfg = config.get_config("demo", dataset="folder", data_dir=str(workdir / "pics" / "left"), channels=1,
                            image_size=16)
    with pytest.raises(quality.QualityError, match="at least 2 classes"):
        quality.load_metric(cfg)


# --- evaluate.py --metrics classifier ----------------------------------------------------------------------

@pytest.fixture
def quick_classifier(monkeypatch):
    real_train = quality.train_classifier
    monkeypatch.setattr(quality, "train_classifier", lambda images, labels, num_classes, **options: real_train(
        images, labels, num_classes, epochs=1, min_steps=20, log=lambda _: None))


def test_evaluate_scores_a_folder_model_by_the_classifier_by_default(workdir, quick_classifier, capsys):
    write_folder(workdir / "pics")
    tiny_checkpoint("pics", dataset="folder", data_dir=str(workdir / "pics"), channels=1, num_classes=2)
    assert run_evaluate("--run-name", "pics", "--num-samples", 20, "--steps", 2, "--device", "cpu") == 0
    record = json.loads(Path("results/metrics/pics.json").read_text())
    for name in ("cfid", "confident", "balance", "accuracy"):
        assert record[name] is not None, name
    assert record["fid"] is None and record["labels"] == "cycle" and record["classifier_accuracy"] == 1.0

    # The same samples again, from their npz: the same numbers, the conditional accuracy included.
    npz = Path(record["samples"])
    assert run_evaluate("--samples", npz, "--metrics", "classifier", "--device", "cpu") == 0
    again = json.loads(Path("results/metrics/pics.json").read_text())
    assert {name: again[name] for name in ("cfid", "confident", "balance", "accuracy")} == \
        {name: record[name] for name in ("cfid", "confident", "balance", "accuracy")}
    with open("results/metrics.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 2 and float(rows[1]["cfid"]) == pytest.approx(record["cfid"], rel=1e-5)


def test_foreign_samples_need_the_dataset_named(workdir, quick_classifier, capsys):
    write_folder(workdir / "pics")
    images = np.random.default_rng(0).integers(0, 255, (20, 16, 16, 3), dtype=np.uint8)
    np.savez("foreign.npz", arr_0=images)
    assert run_evaluate("--samples", "foreign.npz", "--metrics", "classifier", "--device", "cpu") == 1
    assert "give --dataset" in capsys.readouterr().err
    assert run_evaluate("--samples", "foreign.npz", "--metrics", "classifier", "--dataset", "folder",
                        "--data-dir", workdir / "pics", "--channels", "1", "--device", "cpu") == 0
    record = json.loads(Path("results/metrics/foreign.json").read_text())
    assert record["confident"] < 0.5 and record["accuracy"] is None


def test_an_older_metrics_csv_keeps_its_rows_under_the_new_columns(workdir, quick_classifier):
    old_columns = ["run", "step", "sampler", "steps", "guidance", "num_samples", "fid", "isc", "kid", "seconds",
                   "date"]
    Path("results").mkdir()
    with open("results/metrics.csv", "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(old_columns)
        writer.writerow(["old", 5, "ddim", 100, 1.0, 50000, 3.2, 9.1, 0.001, 60, "2026-11-01"])
    evaluate.write_results({"run": "new", "cfid": 1.5, "date": "2026-12-02"})
    with open("results/metrics.csv", newline="") as f:
        reader = csv.DictReader(f)
        rows = list(reader)
    assert tuple(reader.fieldnames) == evaluate.CSV_COLUMNS
    assert rows[0]["run"] == "old" and rows[0]["fid"] == "3.2" and rows[0]["cfid"] == ""
    assert rows[1]["run"] == "new" and rows[1]["cfid"] == "1.5"


def test_too_few_images_are_refused_in_one_sentence(workdir, shapes_metric):
    write_folder(workdir / "few", num_per_class=4)
    cfg = config.get_config("demo", dataset="folder", data_dir=str(workdir / "few"), channels=1, image_size=16)
    with pytest.raises(quality.QualityError, match="needs at least 20 images"):
        quality.load_metric(cfg)
    metric, test_images, _ = shapes_metric
    with pytest.raises(quality.QualityError, match="at least 2 images"):
        metric.score(test_images[:1])


def test_foreign_samples_of_any_size_and_the_dataset_flags_without_samples(workdir, quick_classifier, capsys):
    write_folder(workdir / "pics28", size=28)
    np.savez("foreign28.npz", arr_0=np.zeros((20, 28, 28, 3), np.uint8))
    assert run_evaluate("--samples", "foreign28.npz", "--metrics", "classifier", "--dataset", "folder",
                        "--data-dir", workdir / "pics28", "--channels", "1", "--device", "cpu") == 0
    assert run_evaluate("--run-name", "x", "--dataset", "shapes", "--device", "cpu") == 1
    assert "name the dataset of --samples" in capsys.readouterr().err
