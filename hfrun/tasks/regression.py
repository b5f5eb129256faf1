"""Regression tasks: linear regression with a known answer (linreg), Boston housing and sine regression (SGN 2020)."""
from __future__ import annotations

import math

import numpy as np
import torch
from torch import Tensor

from hfrun import datasets
from hfrun.losses import SquaredError
from hfrun.tasks.base import Batch, DatasetStream, Task, make_generator
from hfrun.tasks.dataset import DatasetTask

EVAL_SEED_OFFSET = 104_729  # a fresh held-out set's generator seed is eval_seed + this


class LinearRegression(Task):
    """y = Xw* + b* + ε, X ~ N(0, I), ε ~ N(0, σ²), fixed training and held-out sets.

    The known optimum of the training loss ½‖Xw + b − y‖²/n is the least-squares
    solution, returned in float64 by `optimum()`; the held-out loss of the true
    parameters is about σ²/2. The metric is the mean squared error per case.
    `final_report` gives a run's distance to that optimum.

    `seed` fixes the problem (w*, b*, the training set) and, unless `eval_seed`
    is given, the held-out set; `eval_seed` draws a fresh held-out set from the
    same problem (hfrun.evaluate --set task.eval_seed=N).
    """

    metric_name = "mse"

    def __init__(self, *, name: str, seed: int, device, dtype: torch.dtype, input_size: int = 10,
                 output_size: int = 1, train_size: int = 2000, eval_size: int = 1000, noise_std: float = 0.1,
                 eval_seed: int | None = None):
        if min(input_size, output_size, train_size, eval_size) < 1 or not 0 <= noise_std < math.inf:
            raise ValueError("linreg needs positive sizes and noise_std >= 0")
        self.name, self.loss = name, SquaredError()
        self.input_size, self.output_size = input_size, output_size
        self.device, self.dtype, self.seed = torch.device(device), dtype, seed
        generator = make_generator(seed + 7919, torch.device("cpu"))
        self.true_weight = torch.randn(output_size, input_size, generator=generator, dtype=torch.float64)
        self.true_bias = torch.randn(output_size, generator=generator, dtype=torch.float64)
        self.train_x, self.train_y = self._sample(train_size, noise_std, generator)
        if eval_seed is not None:
            generator = make_generator(eval_seed + EVAL_SEED_OFFSET, torch.device("cpu"))
        self.eval_x, self.eval_y = self._sample(eval_size, noise_std, generator)

    def _sample(self, size: int, noise_std: float, generator: torch.Generator) -> tuple[Tensor, Tensor]:
        x = torch.randn(size, self.input_size, generator=generator, dtype=torch.float64)
        noise = noise_std * torch.randn(size, self.output_size, generator=generator, dtype=torch.float64)
        y = x @ self.true_weight.T + self.true_bias + noise
        return x, y

    def _on_device(self, tensor: Tensor) -> Tensor:
        return tensor.to(device=self.device, dtype=self.dtype)

    def train_stream(self) -> DatasetStream:
        return DatasetStream(self._on_device(self.train_x), self._on_device(self.train_y),
                             make_generator(self.seed, self.device))

    def eval_batches(self) -> list[Batch]:
        return [Batch(self._on_device(self.eval_x), self._on_device(self.eval_y))]

    def metric_sum(self, outputs: Tensor, batch: Batch) -> Tensor:
        return (outputs - batch.targets).square().sum(-1).sum()

    def optimum(self) -> tuple[Tensor, Tensor]:
        """Least-squares weight (O, I) and bias (O,) on the training set, in float64."""
        design = torch.cat([self.train_x, torch.ones(len(self.train_x), 1, dtype=torch.float64)], dim=1)
        solution = torch.linalg.lstsq(design, self.train_y).solution
        return solution[:-1].T, solution[-1]

    @torch.no_grad()
    def final_report(self, model) -> dict[str, float]:
        """The least-squares optimum's training loss and held-out mse, and how far `model` is above them
        (losses over the whole training set, in float64)."""
        weight, bias = self.optimum()
        optimum_outputs = self.train_x @ weight.T + bias
        optimum_train_loss = float(self.loss(optimum_outputs, self.train_y))  # losses are per-case means
        train_loss = float(self.loss(model(self._on_device(self.train_x)).double().cpu(), self.train_y))
        optimum_val_mse = float((self.eval_x @ weight.T + bias - self.eval_y).square().sum(-1).mean())
        # Rounded: LAPACK's threaded solve may differ in the last bits between two calls on the same data.
        return {key: float(f"{value:.10g}") for key, value in (
            ("optimum_train_loss", optimum_train_loss), ("excess_train_loss", train_loss - optimum_train_loss),
            ("optimum_val_mse", optimum_val_mse))}


BOSTON_SCALINGS = ("global_max", "standardize")


class Boston(DatasetTask):
    """Boston housing: 13 features → the median home value (MEDV); the loss and the metric are the mean squared
    error, mean((z − y)²), as in the SGN release.

    The data: Keras' `boston_housing.npz` split 404/102 exactly as Keras does (seed 113), or the
    classic 506-row CSV given as `csv=` with the same split applied to its rows.
    `scaling`:
      - global_max (the SGN release): the features divided by their single largest value and the
        targets by theirs, the training and the test split each by its own maxima, so the MSE is
        in those scaled units (the SGN paper's 0.0104–0.0116);
      - standardize: each feature to mean 0, std 1 by the training split's statistics; targets unscaled
        (MSE in $1000²).
    """

    metric_name = "mse"
    output_size = 1

    def __init__(self, *, scaling: str = "global_max", csv: str | None = None, **options):
        super().__init__(**options)
        if scaling not in BOSTON_SCALINGS:
            raise ValueError(f"task.scaling={scaling!r} is unknown; choose one of {list(BOSTON_SCALINGS)}")
        self.loss = SquaredError(scale=1.0)  # the SGN release's objective: mean((z − y)²)
        if csv is None:
            data = self.load("boston")
            x_train, y_train, x_test, y_test = data["x_train"], data["y_train"], data["x_test"], data["y_test"]
        else:
            x_train, y_train, x_test, y_test = datasets.keras_split(*datasets.read_boston_csv(csv))
        x_train, y_train, x_test, y_test = (t.to(torch.float64) for t in (x_train, y_train, x_test, y_test))
        if scaling == "global_max":
            x_train, y_train = x_train / x_train.max(), y_train / y_train.max()
            x_test, y_test = x_test / x_test.max(), y_test / y_test.max()
        else:
            mean, std = x_train.mean(0), x_train.std(0).clamp_min(1e-12)
            x_train, x_test = (x_train - mean) / std, (x_test - mean) / std
        self.set_data(x_train, y_train.unsqueeze(1), x_test, y_test.unsqueeze(1))


class Sine(DatasetTask):
    """y = sin(frequency·x) + N(0, noise²), x ~ U(−1, 1): `points` points, the first 30% the test set.

    Generated as the SGN release's script does (numpy: the uniform inputs, then the noise, in that
    order), from numpy.random.RandomState(seed), so a seed fixes the data set. SGN 2020 ran
    frequency 10 and 100 with 10,000 points and noise 0.01 (task=sine_f10, task=sine_f100).
    """

    metric_name = "mse"
    output_size = 1

    def __init__(self, *, frequency: float = 10.0, noise: float = 0.01, points: int = 10_000, **options):
        super().__init__(**options)
        if not (math.isfinite(frequency) and math.isfinite(noise) and noise >= 0) or points < 10:
            raise ValueError(f"task.frequency and task.noise must be finite (noise >= 0) and task.points >= 10, got "
                             f"{frequency!r}, {noise!r}, {points!r}")
        self.loss = SquaredError(scale=1.0)  # the SGN release's objective: mean((z − y)²)
        self.frequency = frequency
        generator = np.random.RandomState(seed_for_numpy(self.seed))
        x = generator.uniform(-1, 1, size=(points, 1))
        y = np.sin(frequency * x)[:, 0] + generator.normal(0, noise, size=(points,))
        test = int(points * 0.3)
        x, y = torch.from_numpy(x), torch.from_numpy(y).unsqueeze(1)
        self.set_data(x[test:], y[test:], x[:test], y[:test])


def seed_for_numpy(seed: int) -> int:
    """numpy's RandomState takes seeds in [0, 2³²); hfrun's seeds may be any 64-bit integer."""
    return seed % 2**32
