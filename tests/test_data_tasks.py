"""The data-set tasks on stand-in files in the real formats (tests/standins.py): preparation against
closed forms, and each task training its default model through the CLI."""
from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from conftest import run_hfrun
from hfrun import datasets
from hfrun.tasks.vision import ImageClassification, MNISTAutoencoder, prepare_images
from hfrun.tasks.regression import Boston, Sine
from standins import write_boston_csv, write_boston_npz, write_cifar_dataset, write_idx_dataset

COMMON = dict(seed=0, device="cpu", dtype=torch.float32, verify=False, download=False)


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("datasets")
    write_idx_dataset(root / "mnist", train=200, test=100, seed=1)
    write_idx_dataset(root / "fashion_mnist", train=200, test=100, seed=2, gz=False)
    write_cifar_dataset(root / "cifar10", records_per_file=40, seed=3)
    write_boston_npz(root / "boston")
    return root


def test_prepare_images_closed_forms():
    images = torch.tensor([[[0, 255], [51, 102]]], dtype=torch.uint8)  # one 2x2 image
    torch.testing.assert_close(prepare_images(images, "scale")[0, 0], torch.tensor([[0, 1], [0.2, 0.4]],
                                                                                   dtype=torch.float64))
    standardized = prepare_images(images, "standardize_image")
    assert standardized.mean().abs() < 1e-12 and abs(standardized.std(unbiased=False) - 1) < 1e-12
    flat = torch.full((1, 3, 2, 2), 7, dtype=torch.uint8)  # a constant image: std floored, not a division by 0
    assert torch.equal(prepare_images(flat, "standardize_channels"), torch.zeros(1, 3, 2, 2, dtype=torch.float64))
    colour = torch.randint(0, 256, (2, 3, 4, 4), dtype=torch.uint8)
    per_channel = prepare_images(colour, "standardize_channels")
    torch.testing.assert_close(per_channel.mean(dim=(2, 3)), torch.zeros(2, 3, dtype=torch.float64))
    pooled = prepare_images(torch.arange(16, dtype=torch.uint8).view(1, 4, 4), "scale", pool=2)
    torch.testing.assert_close(pooled[0, 0] * 255, torch.tensor([[2.5, 4.5], [10.5, 12.5]], dtype=torch.float64))
    with pytest.raises(ValueError, match="task.preprocessing='zscore' is unknown"):
        prepare_images(images, "zscore")


@pytest.mark.parametrize("dataset, shape", [("mnist", [1, 28, 28]), ("fashion_mnist", [1, 28, 28]),
                                            ("cifar10", [3, 32, 32])])
def test_image_classification_shapes_and_sizes(data_dir, dataset, shape):
    task = ImageClassification(name=dataset, dataset=dataset, data_dir=str(data_dir), **COMMON)
    assert task.input_shape == shape and task.input_size == math.prod(shape)
    assert task.model_sizes() == {"input_size": math.prod(shape), "input_shape": shape, "output_size": 10}
    assert task.train_inputs.dtype == torch.float32 and task.train_targets.dtype == torch.int64
    assert task.train_cases == (200 if dataset != "cifar10" else 200)
    wrong = torch.nn.functional.one_hot((task.eval_targets + 1) % 10, 10).float()
    metrics = task.evaluate(lambda x: wrong[: len(x)] if len(x) == len(wrong) else None)
    assert metrics["error"] == 1.0 and metrics["accuracy"] == 0.0


def test_sequential_mnist_reads_pooled_rows_as_steps(data_dir):
    task = ImageClassification(name="seqmnist7", dataset="mnist", pool=4, as_sequence=True, data_dir=str(data_dir),
                               **COMMON)
    raw = datasets.load("mnist", data_dir, verify=False, download=False)["train_images"][0].double() / 255
    expected = raw.view(7, 4, 7, 4).mean(dim=(1, 3))  # average of each 4x4 block; row r is step r
    torch.testing.assert_close(task.train_inputs[0].double(), expected, rtol=1e-6, atol=1e-6)
    assert task.model_sizes()["input_size"] == 7 and task.input_shape == [7, 7]  # 7 pixels per step


def test_autoencoder_targets_are_its_inputs_and_reports_the_training_error(data_dir):
    task = MNISTAutoencoder(name="mnist_autoencoder", data_dir=str(data_dir), **COMMON)
    assert task.output_size == 784 and torch.equal(task.train_inputs, task.train_targets)
    assert task.train_inputs.min() >= 0 and task.train_inputs.max() <= 1
    # z = 0 predicts 1/2 everywhere: Martens' error is Σ (1/2 − t)² over 784 pixels, averaged over cases
    zero = lambda x: torch.zeros(len(x), 784)
    expected = float((0.5 - task.train_targets.double()).square().sum(1).mean())
    assert task.final_report(zero)["train_squared_error"] == pytest.approx(expected, rel=1e-6)


def test_boston_keras_split_and_global_max_scaling(data_dir):
    task = Boston(name="boston", data_dir=str(data_dir), **COMMON)
    assert task.train_cases == 404 and task.eval_inputs.shape == (102, 13)
    for split in (task.train_inputs, task.eval_inputs, task.train_targets, task.eval_targets):
        assert split.max().item() == pytest.approx(1.0)  # each split by its own single maximum
    y = np.load(data_dir / "boston" / "boston_housing.npz")["y"]  # the npz is read once more, by hand
    order = np.arange(506)
    np.random.RandomState(113).shuffle(order)
    torch.testing.assert_close(task.train_targets[:, 0].double(), torch.from_numpy(y[order[:404]] / y[order[:404]].max()),
                               rtol=1e-6, atol=1e-7)


def test_boston_from_a_csv_with_standardized_features(tmp_path):
    csv = write_boston_csv(tmp_path / "boston.csv")
    task = Boston(name="boston", csv=str(csv), scaling="standardize", **COMMON)
    torch.testing.assert_close(task.train_inputs.double().mean(0), torch.zeros(13, dtype=torch.float64),
                               atol=1e-5, rtol=0)
    assert task.eval_targets.max() > 5  # targets stay in their own units


def test_sine_is_generated_as_the_release_does():
    task = Sine(name="sine_f10", frequency=10.0, noise=0.01, points=100, seed=5, device="cpu", dtype=torch.float64)
    rng = np.random.RandomState(5)
    x = rng.uniform(-1, 1, size=(100, 1))
    y = np.sin(10.0 * x)[:, 0] + rng.normal(0, 0.01, size=(100,))
    torch.testing.assert_close(task.eval_inputs, torch.from_numpy(x[:30]))
    torch.testing.assert_close(task.train_targets[:, 0], torch.from_numpy(y[30:]))


def first_and_last_train_loss(run_dir) -> tuple[float, float]:
    events = EventAccumulator(str(run_dir / "tb"), size_guidance={"scalars": 0}).Reload()
    losses = [event.value for event in events.Scalars("train/loss")]
    return losses[0], losses[-1]


TASK_RUNS = {  # task: extra overrides (small batches for the stand-in data)
    "mnist": [], "fashion_mnist": [], "cifar10": [], "seqmnist7": [], "mnist_autoencoder": [],
    "boston": [], "sine_f10": ["task.points=600"],
}


@pytest.mark.parametrize("task", TASK_RUNS)
def test_each_task_trains_its_default_model_through_the_cli(task, data_dir, tmp_path):
    result = run_hfrun(f"task={task}", "solver=hf", "run.max_updates=4", "run.eval_every=4", f"task.data_dir={data_dir}",
                       "task.verify=false", "solver.gradient_batch_size=100", "solver.curvature_batch_size=50",
                       "solver.cg_max_iters=10", "logger.progress=false", *TASK_RUNS[task], cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    (summary_path,) = tmp_path.glob("outputs/*/hf/*/summary.json")
    summary = json.loads(summary_path.read_text())
    assert summary["status"] == "budget" and summary["updates"] == 4
    first, last = first_and_last_train_loss(summary_path.parent)
    assert last < first, (task, first, last)


def test_a_model_that_does_not_fit_the_data_is_named_before_training(data_dir, tmp_path):
    result = run_hfrun("task=boston", "model=cnn", f"task.data_dir={data_dir}", "task.verify=false", cwd=tmp_path)
    assert result.returncode == 1
    assert "model.input_shape must be (channels, height, width)" in result.stderr
    assert "Traceback" not in result.stderr
    result = run_hfrun("task=cifar10", "model=lstm", f"task.data_dir={data_dir}", "task.verify=false", cwd=tmp_path)
    assert result.returncode == 1 and "does not fit the task cifar10" in result.stderr
    assert "Traceback" not in result.stderr


def test_missing_data_without_download_is_one_paragraph(tmp_path):
    result = run_hfrun("task=mnist", f"task.data_dir={tmp_path / 'empty'}", "task.download=false", cwd=tmp_path)
    assert result.returncode == 1 and "Traceback" not in result.stderr
    assert "python -m hfrun.datasets download mnist" in result.stderr
    assert str(tmp_path / "empty" / "mnist") in result.stderr.replace("\n", "")


@pytest.mark.parametrize("solver, task, extra", [
    ("sgn", "fashion_mnist", ["solver.batch_size=100", "solver.cg_max_iters=5"]),
    ("sgn", "cifar10", ["solver.batch_size=100", "solver.cg_max_iters=5"]),
    ("bdhf", "seqmnist7", ["solver.gradient_batch_size=100", "solver.curvature_batch_size=50", "solver.cg_max_iters=10"]),
    ("bdhf", "cifar10", ["model=resnet", "solver.gradient_batch_size=100", "solver.curvature_batch_size=50",
                         "solver.cg_max_iters=10"]),
])
def test_sgn_and_bdhf_train_on_the_data_set_tasks(solver, task, extra, data_dir, tmp_path):
    result = run_hfrun(f"solver={solver}", f"task={task}", "run.max_updates=3", "run.eval_every=3",
                       f"task.data_dir={data_dir}", "task.verify=false", "logger.progress=false", *extra, cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    (summary_path,) = tmp_path.glob(f"outputs/*/{solver}/*/summary.json")
    first, last = first_and_last_train_loss(summary_path.parent)
    assert last < first, (solver, task, first, last)
