"""Small stand-in data files in the real formats (IDX, the CIFAR-10 binary tarball, Keras' npz, the Boston
CSV), with a learnable signal: each class brightens its own block of pixels. Tests never read ../shared."""
from __future__ import annotations

import gzip
import io
import tarfile
from pathlib import Path

import numpy as np

IDX_NAMES = {"train_images": "train-images-idx3-ubyte", "train_labels": "train-labels-idx1-ubyte",
             "test_images": "t10k-images-idx3-ubyte", "test_labels": "t10k-labels-idx1-ubyte"}
BOSTON_HEADER = "CRIM,ZN,INDUS,CHAS,NOX,RM,AGE,DIS,RAD,TAX,PTRATIO,B,LSTAT,MEDV"


def idx_bytes(array: np.ndarray) -> bytes:
    """IDX: big-endian magic 0x0000080<dims> (unsigned bytes), the sizes, then the uint8 data."""
    header = bytes([0, 0, 8, array.ndim]) + b"".join(int(size).to_bytes(4, "big") for size in array.shape)
    return header + np.ascontiguousarray(array, dtype=np.uint8).tobytes()


def class_images(count: int, shape: tuple[int, ...], rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """uint8 images of `shape` whose class (0..9) brightens one horizontal band, plus noise."""
    labels = rng.integers(0, 10, count)
    images = rng.integers(0, 60, (count, *shape)).astype(np.uint8)
    height = shape[-2]
    band = max(1, height // 10)
    for index, label in enumerate(labels):
        start = int(label) * height // 10
        images[index, ..., start:start + band, :] = 250
    return images, labels.astype(np.uint8)


def write_idx_dataset(directory: Path, train: int = 200, test: int = 100, seed: int = 0, gz: bool = True) -> Path:
    """The four MNIST/Fashion-MNIST files (28×28) in `directory`."""
    directory.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    arrays = {}
    arrays["train_images"], arrays["train_labels"] = class_images(train, (28, 28), rng)
    arrays["test_images"], arrays["test_labels"] = class_images(test, (28, 28), rng)
    for role, stem in IDX_NAMES.items():
        data = idx_bytes(arrays[role])
        if gz:
            (directory / f"{stem}.gz").write_bytes(gzip.compress(data, mtime=0))
        else:
            (directory / stem).write_bytes(data)
    return directory


def cifar_records(count: int, rng: np.random.Generator) -> bytes:
    """Binary CIFAR-10 records: 1 label byte, then 1,024 R, 1,024 G and 1,024 B bytes (32×32 row-major)."""
    images, labels = class_images(count, (3, 32, 32), rng)
    return b"".join(bytes([int(label)]) + image.tobytes() for image, label in zip(images, labels))


def tar_gz_bytes(members: dict[str, bytes]) -> bytes:
    """A .tar.gz archive holding `members` (name → content)."""
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w:gz") as tar:
        for name, body in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(body)
            tar.addfile(info, io.BytesIO(body))
    return buffer.getvalue()


def write_cifar_dataset(directory: Path, records_per_file: int = 40, seed: int = 0) -> Path:
    """cifar-10-binary.tar.gz with data_batch_1..5.bin and test_batch.bin, `records_per_file` records each."""
    directory.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    archive = directory / "cifar-10-binary.tar.gz"
    archive.write_bytes(tar_gz_bytes({f"cifar-10-batches-bin/{name}": cifar_records(records_per_file, rng)
                                      for name in [*(f"data_batch_{i}.bin" for i in range(1, 6)), "test_batch.bin"]}))
    return archive


def boston_arrays(rows: int = 506, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Positive features and a target that depends on them linearly, like the real table's ranges."""
    rng = np.random.default_rng(seed)
    x = rng.uniform(0.1, 100.0, (rows, 13))
    y = 5.0 + x[:, :3].sum(1) / 10 + rng.normal(0, 0.5, rows)
    return x, y


def write_boston_npz(directory: Path, rows: int = 506, seed: int = 0) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    x, y = boston_arrays(rows, seed)
    path = directory / "boston_housing.npz"
    np.savez(path, x=x, y=y)
    return path


def write_boston_csv(path: Path, rows: int = 506, seed: int = 0) -> Path:
    x, y = boston_arrays(rows, seed)
    lines = [BOSTON_HEADER] + [",".join(f"{value:.6g}" for value in (*features, target)) for features, target in zip(x, y)]
    path.write_text("\n".join(lines) + "\n")
    return path
