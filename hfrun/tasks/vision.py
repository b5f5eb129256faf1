"""Image data sets: classification (MNIST, Fashion-MNIST, CIFAR-10, sequential MNIST) and the MNIST
deep autoencoder. The files come from hfrun.datasets; the task only prepares them."""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

from hfrun.losses import SigmoidCrossEntropy, SoftmaxCrossEntropy
from hfrun.tasks.dataset import DatasetTask

IMAGE_DATASETS = ("mnist", "fashion_mnist", "cifar10")
PREPROCESSING = ("scale", "standardize_image", "standardize_channels")


def prepare_images(images: Tensor, preprocessing: str, pool: int = 1) -> Tensor:
    """uint8 (N, H, W) or (N, C, H, W) → float64 (N, C, H/pool, W/pool).

    - scale: pixels / 255 (MNIST in the SGN and Martens releases);
    - standardize_image: each image to mean 0, std 1 over all its pixels, the std floored at
      1/√(pixels) as tf.image.per_image_standardization does (Fashion-MNIST in the SGN release);
    - standardize_channels: the same per image and channel (CIFAR-10 in the SGN release).
    `pool` > 1 average-pools after preprocessing (MNIST 28×28 → 7×7 with pool=4, BDHF's sequential MNIST).
    """
    if preprocessing not in PREPROCESSING:
        raise ValueError(f"task.preprocessing={preprocessing!r} is unknown; choose one of {list(PREPROCESSING)}")
    pixels = images.to(torch.float64)
    if pixels.dim() == 3:
        pixels = pixels.unsqueeze(1)
    if preprocessing == "scale":
        pixels = pixels / 255.0
    else:
        dims = (1, 2, 3) if preprocessing == "standardize_image" else (2, 3)
        count = math.prod(pixels.shape[d] for d in dims)
        mean = pixels.mean(dim=dims, keepdim=True)
        std = pixels.std(dim=dims, keepdim=True, unbiased=False).clamp_min(1.0 / math.sqrt(count))
        pixels = (pixels - mean) / std
    if pool > 1:
        pixels = F.avg_pool2d(pixels, pool)
    return pixels


class ImageClassification(DatasetTask):
    """Classify the images of `dataset` (mnist, fashion_mnist, cifar10) into its 10 classes.

    Softmax cross-entropy; the metric is the held-out error rate, and the summary also
    gives the accuracy. Inputs are (B, C, H, W); with `as_sequence` each image
    (after `pool`) is read row by row as a sequence of shape (B, H, C·W), the
    sequential MNIST of BDHF 2017 (MNIST average-pooled to 7×7, 7 steps of 7 pixels).
    """

    metric_name = "error"
    output_size = 10

    def __init__(self, *, dataset: str, preprocessing: str = "scale", pool: int = 1, as_sequence: bool = False,
                 **options):
        super().__init__(**options)
        if dataset not in IMAGE_DATASETS:
            raise ValueError(f"task.dataset={dataset!r} is not an image data set; choose one of {list(IMAGE_DATASETS)}")
        if pool < 1:
            raise ValueError(f"task.pool must be a positive integer, got {pool!r}")
        self.loss = SoftmaxCrossEntropy()
        self.sequence_inputs = as_sequence
        data = self.load(dataset)
        shape = self._layout if as_sequence else (lambda x: x)
        self.set_data(shape(prepare_images(data["train_images"], preprocessing, pool)), data["train_labels"],
                      shape(prepare_images(data["test_images"], preprocessing, pool)), data["test_labels"])

    @staticmethod
    def _layout(images: Tensor) -> Tensor:
        """(N, C, H, W) → (N, H, C·W): rows as time steps."""
        return images.permute(0, 2, 1, 3).flatten(2)

    def derived_metrics(self, metrics: dict[str, float]) -> dict[str, float]:
        return {"accuracy": 1.0 - metrics["error"]}


class MNISTAutoencoder(DatasetTask):
    """Reconstruct MNIST digits through a narrow code (Hinton & Salakhutdinov 2006; Martens 2010).

    Inputs and targets are the 784 pixel intensities in [0, 1] (not binarised), the loss is
    the logistic output's cross-entropy on them (Martens' release). The metric is Martens'
    squared error: Σ over the 784 outputs of (sigmoid(z) − t)², averaged over cases, on the
    test set during the run; the summary's `train_squared_error` is the same over the 60,000
    training images, the figure Martens 2010 reports (1.40 for HF).
    """

    metric_name = "squared_error"
    report_train_metric = True

    def __init__(self, **options):
        super().__init__(**options)
        self.loss = SigmoidCrossEntropy()
        data = self.load("mnist")
        train = prepare_images(data["train_images"], "scale").flatten(1)
        test = prepare_images(data["test_images"], "scale").flatten(1)
        self.set_data(train, train, test, test)

    @property
    def output_size(self) -> int:
        return self.input_size
