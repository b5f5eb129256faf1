"""Download, verify and parse the real data sets: MNIST, Fashion-MNIST, CIFAR-10 (binary) and Boston housing.

    python -m hfrun.datasets download mnist|fashion_mnist|cifar10|boston|all [--root DIR]
    python -m hfrun.datasets verify NAME|all [--root DIR]
    python -m hfrun.datasets list [--root DIR]

Files live in ``<root>/<name>/`` where the root is, in order: the configured value, the environment variable
``HFRUN_DATASETS``, or ``datasets`` below the current directory (:func:`data_root`).

Why not torchvision: the torchvision wheels that pip offers for this project are CUDA builds whose compiled
operators fail to load against the CPU build of torch it pins (``operator torchvision::nms does not exist``), and
the formats are simple, so this module has its own small parsers using only the standard library, numpy and torch.
Parsing uses ``numpy.frombuffer`` (no per-pixel Python loops).

Safety: CIFAR-10 is read from the *binary* release (``cifar-10-binary.tar.gz``: fixed-size records of one label
byte and 3,072 pixel bytes), never from the pickled "python" release, because unpickling a downloaded file can run
arbitrary code. Archive members are read with :mod:`tarfile` straight into memory (nothing is extracted to disk, so
member paths cannot escape the directory). The Boston ``.npz`` is opened with ``allow_pickle=False``.

Integrity: every published file is pinned by checksum. MNIST is pinned by the SHA-256 of the *decompressed* IDX
content (a re-compressed ``.gz`` or a raw decompressed file is accepted when its content matches) and by the MD5 of
the official ``.gz``; Fashion-MNIST by the MD5 of the official ``.gz`` only (a raw or re-compressed copy cannot be
checked against a pin); CIFAR-10 by the published MD5 of the archive; Boston by the SHA-256 in Keras' loader.
Downloads go to a temporary file in the target directory and are renamed into place only after they verify, so a
final file is never half-written. A present file that does not match is moved aside to ``<file>.corrupt`` (never
deleted) and fetched again. Hashes are cached in ``<file>.verified`` (size, mtime and digests) so a run does not
re-hash 50 MB each time; a changed size or mtime means a fresh hash.

``verify=False`` uses present files even when they do not match a pin (a user's own copy), logging a warning that
names each one; they are still parse-checked. Every problem reaches the user as one :class:`DatasetError` paragraph
that says what was wrong and what to do.
"""
from __future__ import annotations

import argparse
import contextlib
import dataclasses
import gzip
import hashlib
import http.client
import json
import logging
import os
import sys
import tarfile
import tempfile
import urllib.error
import urllib.parse
import urllib.request
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO, Sequence

import numpy as np
import torch

from hfrun.errors import HfrunError

log = logging.getLogger("hfrun.datasets")

ENV_VAR = "HFRUN_DATASETS"
DEFAULT_ROOT = "datasets"
TIMEOUT_S = 60.0
CHUNK = 1 << 20
_STAMP_SUFFIX = ".verified"
_IDX_LABELS = 0x00000801
_IDX_IMAGES = 0x00000803
CIFAR_RECORD = 1 + 3 * 32 * 32
BOSTON_COLUMNS = ("CRIM", "ZN", "INDUS", "CHAS", "NOX", "RM", "AGE", "DIS", "RAD", "TAX", "PTRATIO", "B", "LSTAT",
                  "MEDV")


class DatasetError(HfrunError):
    """A data set file is missing, corrupt, unverifiable or unparsable; the message says what to do."""


@dataclass(frozen=True)
class FileSpec:
    """One published file. ``name`` is its name as published (e.g. ``train-images-idx3-ubyte.gz``).

    ``md5`` and ``sha256`` are digests of the published bytes; ``content_sha256`` is the SHA-256 of the
    decompressed bytes of a gzip-compressed single file and, where given, decides (so the raw decompressed file or a
    re-compressed copy is accepted too). ``role`` says what the file holds (``train_images``, ``archive``, ...).
    """

    name: str
    urls: tuple[str, ...]
    role: str
    md5: str | None = None
    sha256: str | None = None
    content_sha256: str | None = None

    @property
    def gzipped(self) -> bool:
        return self.name.endswith(".gz") and not self.name.endswith(".tar.gz")

    @property
    def raw_name(self) -> str | None:
        """The decompressed name that is accepted in place of a ``.gz``, or None."""
        return self.name[:-3] if self.gzipped else None

    @property
    def pinned(self) -> bool:
        return bool(self.md5 or self.sha256 or self.content_sha256)


@dataclass(frozen=True)
class DatasetSpec:
    """A data set: its files and how to parse them.

    ``kind`` is ``"idx"`` (MNIST-like: roles train_images, train_labels, test_images, test_labels), ``"cifar10"``
    (one binary tar archive, role ``archive``, holding ``train_members`` and ``test_members`` of
    ``records_per_file`` records each) or ``"boston"`` (one ``.npz``, role ``data``, split by :func:`keras_split`).
    ``n_train``/``n_test`` (or ``n_rows`` for boston) are the expected counts; None skips that check.
    For boston, a classic CSV named one of ``csv_names`` is used in place of a missing ``.npz`` when the SHA-256 of
    its parsed values (float64 little-endian, rows of the 13 features then MEDV) is ``csv_values_sha256``.
    """

    name: str
    kind: str
    files: tuple[FileSpec, ...]
    title: str = ""
    homepage: str = ""
    num_classes: int = 10
    image_shape: tuple[int, ...] = (28, 28)
    n_train: int | None = None
    n_test: int | None = None
    n_rows: int | None = None
    records_per_file: int = 10000
    train_members: tuple[str, ...] = ()
    test_members: tuple[str, ...] = ()
    csv_names: tuple[str, ...] = ()
    csv_values_sha256: str | None = None

    def file(self, role: str) -> FileSpec:
        for spec in self.files:
            if spec.role == role:
                return spec
        raise DatasetError(f"Data set spec {self.name!r} has no file with role {role!r}; its files are "
                           f"{', '.join(f'{f.name} ({f.role})' for f in self.files)}. Fix the DatasetSpec.")


_MNIST_MIRRORS = ("https://ossci-datasets.s3.amazonaws.com/mnist/", "http://yann.lecun.com/exdb/mnist/")
_FASHION_MIRRORS = ("http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/",)
_IDX_ROLES = {"train-images-idx3-ubyte": "train_images", "train-labels-idx1-ubyte": "train_labels",
              "t10k-images-idx3-ubyte": "test_images", "t10k-labels-idx1-ubyte": "test_labels"}


def _idx_files(mirrors: Sequence[str], md5: dict[str, str], content: dict[str, str]) -> tuple[FileSpec, ...]:
    return tuple(FileSpec(f"{stem}.gz", tuple(m + f"{stem}.gz" for m in mirrors), role, md5=md5[stem],
                          content_sha256=content.get(stem)) for stem, role in _IDX_ROLES.items())


DATASETS: dict[str, DatasetSpec] = {
    "mnist": DatasetSpec(
        "mnist", "idx", title="MNIST handwritten digits", homepage="http://yann.lecun.com/exdb/mnist/",
        n_train=60000, n_test=10000,
        # .gz MD5s: torchvision/datasets/mnist.py (MNIST.resources); content SHA-256s of the decompressed IDX files.
        files=_idx_files(_MNIST_MIRRORS,
                         md5={"train-images-idx3-ubyte": "f68b3c2dcbeaaa9fbdd348bbdeb94873",
                              "train-labels-idx1-ubyte": "d53e105ee54ea40749a09fcbcd1e9432",
                              "t10k-images-idx3-ubyte": "9fb629c4189551a2d022fa330f9573f3",
                              "t10k-labels-idx1-ubyte": "ec29112dd5afa0611ce80d1b7f02629c"},
                         content={"train-images-idx3-ubyte":
                                  "ba891046e6505d7aadcbbe25680a0738ad16aec93bde7f9b65e87a2fc25776db",
                                  "train-labels-idx1-ubyte":
                                  "65a50cbbf4e906d70832878ad85ccda5333a97f0f4c3dd2ef09a8a9eef7101c5",
                                  "t10k-images-idx3-ubyte":
                                  "0fa7898d509279e482958e8ce81c8e77db3f2f8254e26661ceb7762c4d494ce7",
                                  "t10k-labels-idx1-ubyte":
                                  "ff7bcfd416de33731a308c3f266cc351222c34898ecbeaf847f06e48f7ec33f2"})),
    "fashion_mnist": DatasetSpec(
        "fashion_mnist", "idx", title="Fashion-MNIST (Zalando)",
        homepage="https://github.com/zalandoresearch/fashion-mnist", n_train=60000, n_test=10000,
        # .gz MD5s: torchvision/datasets/mnist.py (FashionMNIST.resources); no content hashes are pinned.
        files=_idx_files(_FASHION_MIRRORS,
                         md5={"train-images-idx3-ubyte": "8d4fb7e6c68d591d4c3dfef9ec88bf0d",
                              "train-labels-idx1-ubyte": "25c81989df183df01b3e8a0aad5dffbe",
                              "t10k-images-idx3-ubyte": "bef4ecab320f06d8554ea6380940ec79",
                              "t10k-labels-idx1-ubyte": "bb300cfdad3c16e7a12a480ee83cd310"},
                         content={})),
    "cifar10": DatasetSpec(
        "cifar10", "cifar10", title="CIFAR-10 (binary version)", homepage="https://www.cs.toronto.edu/~kriz/cifar.html",
        image_shape=(3, 32, 32), n_train=50000, n_test=10000, records_per_file=10000,
        train_members=tuple(f"cifar-10-batches-bin/data_batch_{i}.bin" for i in range(1, 6)),
        test_members=("cifar-10-batches-bin/test_batch.bin",),
        # MD5 as published on the CIFAR page for the binary version.
        files=(FileSpec("cifar-10-binary.tar.gz", ("https://www.cs.toronto.edu/~kriz/cifar-10-binary.tar.gz",),
                        "archive", md5="c32a1d4ab5d03f1284b67883e8d87530"),)),
    "boston": DatasetSpec(
        "boston", "boston", title="Boston housing (Keras copy, 506 rows, 13 features)",
        homepage="http://lib.stat.cmu.edu/datasets/boston", n_rows=506,
        # The classic CSV (as in scikit-learn's boston_house_prices.csv) has the same rows in the same order as
        # Keras' npz: its keras_split reproduces Keras' first training row (1.23247, 0, 8.14, ...) and targets
        # (15.2, 42.3, 50, 21.1, 17.7). Its values are pinned by the hash of the parsed numbers, so formatting
        # (quotes, line endings, the count line scikit-learn's copy starts with) does not matter.
        csv_names=("boston_house_prices.csv", "BostonHousing.csv", "boston.csv", "housing.csv"),
        csv_values_sha256="832e894115c56dd24ec63848d4a3d9bd921d268d0be1bee2a8f4ee5ea318f5f7",
        # URL and SHA-256: keras/src/datasets/boston_housing.py (load_data).
        files=(FileSpec("boston_housing.npz",
                        ("https://storage.googleapis.com/tensorflow/tf-keras-datasets/boston_housing.npz",), "data",
                        sha256="f553886a1f8d56431e820c5b82552d9d95cfcb96d1e678153f8839538947dff5"),)),
}


# --------------------------------------------------------------------------------------------------------- roots


def data_root(configured: str | os.PathLike | None = None) -> Path:
    """The data root: ``configured`` (a config key), else ``$HFRUN_DATASETS``, else ``./datasets``; absolute."""
    for value in (configured, os.environ.get(ENV_VAR)):
        if value is not None and str(value).strip():
            return Path(os.path.abspath(os.path.expanduser(os.fspath(value))))
    return Path(os.path.abspath(DEFAULT_ROOT))


def _spec(name: str | DatasetSpec) -> DatasetSpec:
    if isinstance(name, DatasetSpec):
        return name
    try:
        return DATASETS[name]
    except (KeyError, TypeError):
        raise DatasetError(f"Unknown data set {name!r}. Known data sets: {', '.join(DATASETS)}. "
                           f"Run `python -m hfrun.datasets list` to see them and where they are kept.") from None


def _cmd(spec: DatasetSpec) -> str:
    return f"`python -m hfrun.datasets download {spec.name}`"


# ------------------------------------------------------------------------------------------------------- hashing


def _open_content(path: Path) -> BinaryIO:
    """The file's content, decompressed when it starts with the gzip magic bytes."""
    with open(path, "rb") as handle:
        head = handle.read(2)
    return gzip.open(path, "rb") if head == b"\x1f\x8b" else open(path, "rb")


def _digests(path: Path, gz_member: bool) -> dict[str, str]:
    """md5 and sha256 of the bytes on disk and, for a gz member file, sha256 of its content."""
    md5, sha = hashlib.md5(), hashlib.sha256()
    with open(path, "rb") as handle:
        head = handle.read(2)
        handle.seek(0)
        while chunk := handle.read(CHUNK):
            md5.update(chunk)
            sha.update(chunk)
    out = {"md5": md5.hexdigest(), "sha256": sha.hexdigest()}
    if gz_member:
        if head == b"\x1f\x8b":
            content = hashlib.sha256()
            try:
                with gzip.open(path, "rb") as handle:
                    while chunk := handle.read(CHUNK):
                        content.update(chunk)
                out["content_sha256"] = content.hexdigest()
            except (OSError, EOFError, gzip.BadGzipFile, zipfile.BadZipFile) as error:
                out["gzip_error"] = f"{type(error).__name__}: {error}"
        else:
            out["content_sha256"] = out["sha256"]
    return out


def _share(path: Path) -> None:
    """Give a file made by mkstemp (mode 0600) the permissions an ordinary new file gets (0666 less the umask)."""
    mask = os.umask(0o022)
    os.umask(mask)
    with contextlib.suppress(OSError):
        os.chmod(path, 0o666 & ~mask)


def _stamp_path(path: Path) -> Path:
    return path.with_name(path.name + _STAMP_SUFFIX)


def _cached_digests(path: Path, gz_member: bool) -> dict[str, str]:
    """_digests, cached in ``<file>.verified`` keyed by size and mtime (written atomically, best effort)."""
    stat = path.stat()
    stamp = _stamp_path(path)
    try:
        cached = json.loads(stamp.read_text())
        if (cached.get("size") == stat.st_size and cached.get("mtime_ns") == stat.st_mtime_ns
                and (not gz_member or "content_sha256" in cached or "gzip_error" in cached)):
            return cached
    except (OSError, ValueError, AttributeError):
        pass
    digests = _digests(path, gz_member)
    record = {"file": path.name, "size": stat.st_size, "mtime_ns": stat.st_mtime_ns, **digests}
    try:
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{stamp.name}.", suffix=".tmp")
        with os.fdopen(fd, "w") as handle:
            json.dump(record, handle, indent=1)
        _share(Path(tmp))
        os.replace(tmp, stamp)
    except OSError:
        with contextlib.suppress(OSError, UnboundLocalError):
            os.unlink(tmp)
    return record


def _check(file: FileSpec, digests: dict[str, str], raw: bool) -> tuple[bool | None, str]:
    """(True, "") when the file matches its pins, (False, why) when it contradicts them, (None, why) when there is
    no pin that could check it (a raw or re-compressed copy of a file pinned only by the digest of its .gz)."""
    if not file.pinned:
        return True, ""
    if file.content_sha256:
        if "gzip_error" in digests:
            return False, f"it is not a readable gzip file ({digests['gzip_error']})"
        found = digests.get("content_sha256")
        if found == file.content_sha256:
            return True, ""
        return False, (f"the SHA-256 of its {'content' if raw else 'decompressed content'} is {found}, expected "
                       f"{file.content_sha256}")
    if raw:
        return None, (f"it is the decompressed file, and only the MD5 of the official {file.name} is known "
                      f"({file.md5 or file.sha256}), so it cannot be checked")
    wrong = []
    for key in ("md5", "sha256"):
        want = getattr(file, key)
        if want and digests[key] != want:
            wrong.append(f"its {key.upper()} is {digests[key]}, expected {want}")
    if wrong:
        if file.gzipped and not file.sha256:
            wrong.append(f"a re-compressed copy cannot be checked because only the official {file.name}'s digest "
                         f"is known")
        return False, "; ".join(wrong)
    return True, ""


def _move_aside(path: Path) -> Path:
    target = path.with_name(path.name + ".corrupt")
    n = 2
    while target.exists() or target.is_symlink():
        target = path.with_name(f"{path.name}.corrupt-{n}")
        n += 1
    os.replace(path, target)
    with contextlib.suppress(OSError):
        _stamp_path(path).unlink()
    return target


# ------------------------------------------------------------------------------------------------------ download


class _Failed(Exception):
    """One mirror did not give a good copy; the message is the reason."""


def _progress_bar(enabled: bool):
    if not enabled:
        return contextlib.nullcontext(None)
    from rich.console import Console
    from rich.progress import (BarColumn, DownloadColumn, Progress, TextColumn, TimeRemainingColumn,
                               TransferSpeedColumn)
    return Progress(TextColumn("{task.description}"), BarColumn(), DownloadColumn(), TransferSpeedColumn(),
                    TimeRemainingColumn(), console=Console(stderr=True), transient=False)


def _fetch(url: str, file: FileSpec, directory: Path, progress: bool) -> Path:
    """Download ``url`` into a temporary file in ``directory``, verify it, rename it to ``file.name``."""
    try:
        fd, tmp_name = tempfile.mkstemp(dir=directory, prefix=f".{file.name}.", suffix=".part")
    except OSError as error:
        raise DatasetError(f"Cannot write to the data directory {directory} ({type(error).__name__}: {error}). "
                           f"Make it writable, or choose another root with --root DIR, the config key, or the "
                           f"{ENV_VAR} environment variable.") from None
    tmp = Path(tmp_name)
    try:
        with os.fdopen(fd, "wb") as out:
            _transfer(url, file, out, progress)
        ok, why = _check(file, _digests(tmp, file.gzipped), raw=False)
        if ok is False:
            raise _Failed(f"the downloaded file is corrupt: {why}")
        final = directory / file.name
        _share(tmp)
        os.replace(tmp, final)
        return final
    finally:
        with contextlib.suppress(OSError):
            tmp.unlink()


def _transfer(url: str, file: FileSpec, out: BinaryIO, progress: bool) -> None:
    try:
        request = urllib.request.Request(url, headers={"User-Agent": "hfrun-datasets/1"})
        with urllib.request.urlopen(request, timeout=TIMEOUT_S) as response, _progress_bar(progress) as bar:
            total = response.headers.get("Content-Length")
            total = int(total) if total and total.isdigit() else None
            task = bar.add_task(file.name, total=total) if bar is not None else None
            received = 0
            while chunk := response.read(CHUNK):
                out.write(chunk)
                received += len(chunk)
                if bar is not None:
                    bar.update(task, advance=len(chunk))
            if total is not None and received != total:
                raise _Failed(f"the connection dropped after {received} of {total} bytes")
    except _Failed:
        raise
    except urllib.error.HTTPError as error:
        error.close()
        raise _Failed(f"HTTP {error.code} {error.reason}") from None
    except urllib.error.URLError as error:
        raise _Failed(f"could not connect ({type(error.reason).__name__}: {error.reason})"
                      if isinstance(error.reason, BaseException) else f"could not connect ({error.reason})") from None
    except (http.client.HTTPException, OSError) as error:  # IncompleteRead, ConnectionResetError, timeouts, ...
        raise _Failed(f"the transfer failed ({type(error).__name__}: {error})") from None


# -------------------------------------------------------------------------------------------------------- ensure


def _candidates(file: FileSpec, directory: Path) -> list[Path]:
    names = [file.name] + ([file.raw_name] if file.raw_name else [])
    return [directory / n for n in names if (directory / n).is_file()]


def _resolve(spec: DatasetSpec, root, download: bool, verify: bool, progress: bool) -> tuple[Path, dict[str, Path]]:
    """The directory and, per role, the file to parse; downloads what is missing."""
    directory = data_root(root) / spec.name
    chosen: dict[str, Path] = {}
    moved: list[str] = []
    unverifiable: dict[str, str] = {}
    missing: list[FileSpec] = []
    for file in spec.files:
        found = None
        for path in _candidates(file, directory):
            raw = path.name != file.name
            try:
                ok, why = _check(file, _cached_digests(path, file.gzipped), raw)
            except OSError as error:
                raise DatasetError(f"{path} could not be read ({type(error).__name__}: {error}). Check its "
                                   f"permissions, or remove it and run {_cmd(spec)}.") from None
            if ok:
                found = path
                break
            if not verify:
                log.warning("Using %s without verification (verify=false): %s.", path, why)
                found = path
                break
            if ok is None:
                unverifiable[file.role] = f"{path} is present but {why}"
                log.warning("Not using %s: %s.", path, why)
                continue
            try:
                target = _move_aside(path)
            except OSError as error:
                raise DatasetError(f"{path} does not match its checksum ({why}) and could not be moved aside "
                                   f"({type(error).__name__}: {error}). Move or remove it yourself, then run "
                                   f"{_cmd(spec)} (or put a good copy from {' or '.join(file.urls)} there).") from None
            moved.append(f"{path} did not match ({why}) and was moved aside to {target.name}")
            log.warning("%s did not match its checksum (%s); moved aside to %s.", path, why, target)
        if found is None and spec.kind == "boston" and file.role == "data":
            found = _boston_csv(spec, directory, verify, unverifiable)
        if found is not None:
            chosen[file.role] = found
        else:
            missing.append(file)
    if missing and download:
        try:
            directory.mkdir(parents=True, exist_ok=True)
        except OSError as error:
            raise DatasetError(f"The data directory {directory} could not be created ({error}). Choose a writable "
                               f"root with --root DIR, the config key, or the {ENV_VAR} environment "
                               f"variable.") from None
        dead_hosts: set[str] = set()
        failures: list[str] = []
        for file in missing:
            reasons = []
            for url in file.urls:
                host = urllib.parse.urlsplit(url).netloc
                if host in dead_hosts:
                    reasons.append(f"{url} (skipped: {host} was unreachable for an earlier file)")
                    continue
                log.info("Downloading %s", url)
                try:
                    chosen[file.role] = _fetch(url, file, directory, progress)
                    break
                except _Failed as failure:
                    reasons.append(f"{url} ({failure})")
                    if str(failure).startswith("could not connect"):
                        dead_hosts.add(host)
                    log.warning("Download of %s failed: %s", url, failure)
            else:
                failures.append(f"{file.name}: tried {'; '.join(reasons) if reasons else 'no URL (none known)'}")
        if failures:
            raise DatasetError(_missing_message(spec, directory, [f for f in missing if f.role not in chosen],
                                                moved, unverifiable, f"could not be downloaded: "
                                                f"{' | '.join(failures)}"))
    elif missing:
        raise DatasetError(_missing_message(spec, directory, missing, moved, unverifiable,
                                            "{be} missing and downloading is off"))
    return directory, chosen


def _boston_values_sha256(x: torch.Tensor, y: torch.Tensor) -> str:
    values = np.concatenate([x.numpy(), y.numpy()[:, None]], axis=1).astype("<f8")
    return hashlib.sha256(np.ascontiguousarray(values).tobytes()).hexdigest()


def _boston_csv(spec: DatasetSpec, directory: Path, verify: bool, unverifiable: dict[str, str]) -> Path | None:
    """A classic Boston CSV in the directory whose values match the pin (or any, with verify=False), or None."""
    for name in spec.csv_names:
        path = directory / name
        if not path.is_file():
            continue
        try:
            found = _boston_values_sha256(*read_boston_csv(path))
        except DatasetError as error:
            if not verify:
                raise
            why = f"it could not be parsed ({error})"
        else:
            if spec.csv_values_sha256 is None or found == spec.csv_values_sha256:
                log.info("Using %s in place of %s (its values match the pin).", path, spec.file("data").name)
                return path
            why = f"the SHA-256 of its parsed values is {found}, expected {spec.csv_values_sha256}"
        if not verify:
            log.warning("Using %s without verification (verify=false): %s.", path, why)
            return path
        unverifiable["data"] = f"{path} is present but not used: {why}"
        log.warning("Not using %s: %s.", path, why)
    return None


def _missing_message(spec: DatasetSpec, directory: Path, files: list[FileSpec], moved: list[str],
                     unverifiable: dict[str, str], what: str) -> str:
    names = ", ".join(f.name for f in files)
    text = f"Data set {spec.name!r}: {names} {what.replace('{be}', 'is' if len(files) == 1 else 'are')}."
    if moved:
        text += f" Note: {'; '.join(moved)} (nothing was deleted)."
    notes = [unverifiable[f.role] for f in files if f.role in unverifiable]
    if notes:
        text += (f" Also: {'; '.join(notes)}; put the official compressed file(s) there instead, or set "
                 f"verify=false to use your copy unchecked.")
    urls = "; ".join(f"{f.name} from {' or '.join(f.urls)}" for f in files if f.urls)
    raw = [f.raw_name for f in files if f.raw_name]
    text += (f" To fix: get {urls} and put {'them' if len(files) > 1 else 'it'} in {directory}/"
             f"{' (the .gz or the decompressed file)' if raw else ''}, or run {_cmd(spec)} where the network is "
             f"reachable (use --root or {ENV_VAR} for another data root).")
    return text


def ensure(name: str | DatasetSpec, root=None, *, download: bool = True, verify: bool = True,
           progress: bool = True) -> Path:
    """``root/<name>/`` holding verified files; downloads only what is missing (or was moved aside)."""
    return _resolve(_spec(name), root, download, verify, progress)[0]


# -------------------------------------------------------------------------------------------------------- parsers


def _read_bytes(path: Path) -> bytearray:
    """The (decompressed) content of ``path`` as a writable buffer; DatasetError when unreadable."""
    try:
        with _open_content(Path(path)) as handle:
            return bytearray(handle.read())
    except (OSError, EOFError, gzip.BadGzipFile) as error:
        raise DatasetError(f"{path} could not be read ({type(error).__name__}: {error}); it is probably truncated "
                           f"or not the published file. Move it away and download it again with "
                           f"`python -m hfrun.datasets download NAME`.") from None


def read_idx(path: str | os.PathLike) -> torch.Tensor:
    """An IDX file (gzipped or raw): uint8 labels (magic 0x00000801, 1-D) or images (0x00000803, 3-D)."""
    path = Path(path)
    data = _read_bytes(path)
    redo = "Replace it with the published file (`python -m hfrun.datasets download NAME`)."
    if len(data) < 8:
        raise DatasetError(f"{path} is not an IDX file: it holds only {len(data)} bytes. {redo}")
    magic = int.from_bytes(data[:4], "big")
    if magic not in (_IDX_LABELS, _IDX_IMAGES):
        raise DatasetError(f"{path} is not an unsigned-byte IDX label or image file: its magic number is "
                           f"0x{magic:08x}, expected 0x{_IDX_LABELS:08x} (labels) or 0x{_IDX_IMAGES:08x} (images). "
                           f"{redo}")
    ndim = magic & 0xFF
    header = 4 + 4 * ndim
    if len(data) < header:
        raise DatasetError(f"{path} is truncated: its header needs {header} bytes, the file holds {len(data)}. "
                           f"{redo}")
    dims = tuple(int.from_bytes(data[4 + 4 * i: 8 + 4 * i], "big") for i in range(ndim))
    expected = header + int(np.prod(dims, dtype=np.int64))
    if len(data) != expected:
        kind = "truncated" if len(data) < expected else "longer than its header says"
        raise DatasetError(f"{path} is {kind}: dimensions {' x '.join(map(str, dims))} need {expected} bytes "
                           f"(header included), found {len(data)}. {redo}")
    array = np.frombuffer(data, dtype=np.uint8, offset=header).reshape(dims)
    return torch.from_numpy(array)


def _check_labels(labels: torch.Tensor, num_classes: int, where: str) -> None:
    if labels.numel() and int(labels.max()) >= num_classes:
        bad = int((labels >= num_classes).nonzero()[0, 0])
        raise DatasetError(f"{where} holds label {int(labels[bad])} at index {bad}; labels must be 0..{num_classes - 1}. "
                           f"The file is corrupt or not the published one: move it away and run "
                           f"`python -m hfrun.datasets download NAME`.")


def _cifar_record_array(data: bytes | bytearray, where: str, records: int | None) -> tuple[np.ndarray, np.ndarray]:
    if records is not None and len(data) != records * CIFAR_RECORD:
        raise DatasetError(f"{where} holds {len(data)} bytes, expected {records} records of {CIFAR_RECORD} bytes "
                           f"({records * CIFAR_RECORD} bytes); it is truncated or not a CIFAR-10 binary batch. Get "
                           f"the published archive again with `python -m hfrun.datasets download cifar10`.")
    if records is None and (len(data) == 0 or len(data) % CIFAR_RECORD):
        raise DatasetError(f"{where} holds {len(data)} bytes, not a whole number of {CIFAR_RECORD}-byte CIFAR-10 "
                           f"records. Get the published archive again with "
                           f"`python -m hfrun.datasets download cifar10`.")
    array = np.frombuffer(data, dtype=np.uint8).reshape(-1, CIFAR_RECORD)
    labels = array[:, 0].astype(np.int64)
    if labels.size and labels.max() > 9:
        bad = int(np.argmax(labels > 9))
        raise DatasetError(f"{where}: record {bad} has label {labels[bad]}; CIFAR-10 labels are 0..9. The file is "
                           f"corrupt or not a CIFAR-10 binary batch (CIFAR-100's binary records differ). Get the "
                           f"published archive with `python -m hfrun.datasets download cifar10`.")
    return array[:, 1:].reshape(-1, 3, 32, 32), labels


def read_cifar_batches(paths_or_tar: str | os.PathLike | Sequence[str | os.PathLike], *,
                       members: Sequence[str] | None = None,
                       records_per_file: int | None = 10000) -> tuple[torch.Tensor, torch.Tensor]:
    """Binary CIFAR-10 batches: images uint8 (N, 3, 32, 32) and labels int64 (N,).

    ``paths_or_tar`` is a list of ``.bin`` files, or one tar archive (``.tar.gz`` or ``.tar``) from which
    ``members`` (paths inside the archive, in this order) are read into memory without extracting anything. Each
    file must hold exactly ``records_per_file`` records (None: any whole number) of 1 label byte + 3,072 pixel bytes
    (1,024 red, then green, then blue, each 32x32 row-major); labels must be 0..9.
    """
    parts: list[tuple[np.ndarray, np.ndarray]] = []
    if isinstance(paths_or_tar, (str, os.PathLike)):
        archive = Path(paths_or_tar)
        if not members:
            raise DatasetError(f"read_cifar_batches({archive}) needs the member names to read from the archive.")
        blobs = _tar_members(archive, members, records_per_file)
        for member in members:
            parts.append(_cifar_record_array(blobs[member], f"{archive} member {member}", records_per_file))
    else:
        for path in paths_or_tar:
            path = Path(path)
            try:
                data = path.read_bytes()
            except OSError as error:
                raise DatasetError(f"{path} could not be read ({type(error).__name__}: {error}). Get the CIFAR-10 "
                                   f"binary archive with `python -m hfrun.datasets download cifar10`.") from None
            parts.append(_cifar_record_array(data, str(path), records_per_file))
    return _cifar_join(parts)


def _cifar_join(parts: list[tuple[np.ndarray, np.ndarray]]) -> tuple[torch.Tensor, torch.Tensor]:
    if not parts:
        raise DatasetError("No CIFAR-10 batch files were given to read.")
    images = np.concatenate([p[0] for p in parts]) if len(parts) > 1 else parts[0][0].copy()
    labels = np.concatenate([p[1] for p in parts])
    return torch.from_numpy(images), torch.from_numpy(labels)


def _tar_members(archive: Path, members: Sequence[str], records: int | None) -> dict[str, bytes]:
    """Read the wanted regular-file members in one pass, into memory (no extraction)."""
    wanted = set(members)
    found: dict[str, bytes] = {}
    redo = "Move it away and run `python -m hfrun.datasets download cifar10` to get the published archive."
    try:
        with tarfile.open(archive, "r:*") as tar:
            for info in tar:
                name = info.name.removeprefix("./")
                if name not in wanted or name in found:
                    continue
                if not info.isreg():
                    raise DatasetError(f"{archive}: member {name} is not a regular file. {redo}")
                if records is not None and info.size != records * CIFAR_RECORD:
                    raise DatasetError(f"{archive}: member {name} holds {info.size} bytes, expected {records} "
                                       f"records of {CIFAR_RECORD} bytes ({records * CIFAR_RECORD} bytes). {redo}")
                handle = tar.extractfile(info)
                data = handle.read() if handle is not None else b""
                if len(data) != info.size:
                    raise DatasetError(f"{archive}: member {name} is truncated ({len(data)} of {info.size} bytes). "
                                       f"{redo}")
                found[name] = data
    except DatasetError:
        raise
    except (tarfile.TarError, OSError, EOFError, zipfile.BadZipFile) as error:
        raise DatasetError(f"{archive} could not be read as a tar archive ({type(error).__name__}: {error}); it is "
                           f"truncated or not the published file. {redo}") from None
    absent = [m for m in members if m not in found]
    if absent:
        raise DatasetError(f"{archive} lacks {', '.join(absent)}: it is not the CIFAR-10 binary release (note: the "
                           f"pickled 'python' release is deliberately not supported). {redo}")
    return found


def _boston_arrays(x: np.ndarray, y: np.ndarray, path: Path, fix: str) -> tuple[torch.Tensor, torch.Tensor]:
    if x.ndim != 2 or x.shape[1] != 13 or y.ndim != 1 or y.shape[0] != x.shape[0]:
        raise DatasetError(f"{path}: expected x of shape (rows, 13) and y of shape (rows,), found x {x.shape} and "
                           f"y {y.shape}. {fix}")
    if not (np.issubdtype(x.dtype, np.number) and np.issubdtype(y.dtype, np.number)):
        raise DatasetError(f"{path}: x and y must be numeric, found {x.dtype} and {y.dtype}. {fix}")
    x, y = x.astype(np.float64), y.astype(np.float64)
    if not (np.isfinite(x).all() and np.isfinite(y).all()):
        raise DatasetError(f"{path}: x or y holds NaN or infinite values. {fix}")
    return torch.from_numpy(x), torch.from_numpy(y)


def read_boston_npz(path: str | os.PathLike) -> tuple[torch.Tensor, torch.Tensor]:
    """Keras' ``boston_housing.npz`` (arrays ``x`` (506, 13) and ``y`` (506,)), opened with allow_pickle=False."""
    path = Path(path)
    fix = "Move it away and run `python -m hfrun.datasets download boston` to get the published file."
    try:
        with np.load(path, allow_pickle=False) as archive:
            if not isinstance(archive, np.lib.npyio.NpzFile):
                raise DatasetError(f"{path} is a single .npy array, not an .npz archive with arrays x and y. {fix}")
            absent = [k for k in ("x", "y") if k not in archive.files]
            if absent:
                raise DatasetError(f"{path} lacks array(s) {', '.join(absent)} (it holds "
                                   f"{', '.join(archive.files) or 'none'}). {fix}")
            x, y = archive["x"], archive["y"]
    except DatasetError:
        raise
    except (OSError, ValueError, EOFError, zipfile.BadZipFile, KeyError) as error:
        raise DatasetError(f"{path} could not be read as an .npz of plain numeric arrays ({type(error).__name__}: "
                           f"{error}). {fix}") from None
    return _boston_arrays(x, y, path, fix)


def read_boston_csv(path: str | os.PathLike) -> tuple[torch.Tensor, torch.Tensor]:
    """The classic 506-row CSV with header CRIM,ZN,...,LSTAT,MEDV: x float64 (rows, 13), y = MEDV (rows,)."""
    import csv
    path = Path(path)
    fix = f"It must be comma-separated with the header {','.join(BOSTON_COLUMNS)} and 14 numbers per row."
    try:
        with open(path, newline="", encoding="utf-8-sig") as handle:
            rows = list(csv.reader(handle))
    except (OSError, UnicodeDecodeError, csv.Error) as error:
        raise DatasetError(f"{path} could not be read as CSV ({type(error).__name__}: {error}). {fix}") from None
    rows = [r for r in rows if any(cell.strip() for cell in r)]
    if not rows:
        raise DatasetError(f"{path} is empty. {fix}")
    header = tuple(c.strip().strip('"').upper() for c in rows[0])
    if header != BOSTON_COLUMNS and len(rows) > 1 and _is_float(rows[0][0]):  # scikit-learn's "506,13,..." line
        rows = rows[1:]
        header = tuple(c.strip().strip('"').upper() for c in rows[0])
    if header != BOSTON_COLUMNS:
        raise DatasetError(f"{path}: the header is {','.join(header)}, expected {','.join(BOSTON_COLUMNS)}. {fix}")
    values = np.empty((len(rows) - 1, 14), dtype=np.float64)
    for i, row in enumerate(rows[1:]):
        if len(row) != 14:
            raise DatasetError(f"{path}, line {i + 2}: {len(row)} fields, expected 14. {fix}")
        try:
            values[i] = [float(cell) for cell in row]
        except ValueError:
            bad = next(c for c in row if not _is_float(c))
            raise DatasetError(f"{path}, line {i + 2}: {bad!r} is not a number. {fix}") from None
    return _boston_arrays(values[:, :13], values[:, 13], path, fix)


def _is_float(text: str) -> bool:
    try:
        float(text)
        return True
    except ValueError:
        return False


def keras_split(x, y, seed: int = 113, test_split: float = 0.2):
    """Keras' boston_housing split: shuffle with RandomState(seed), the first int(n * (1 - test_split)) train.

    Returns (x_train, y_train, x_test, y_test) with the input's type (tensors or arrays).
    """
    if not 0 <= test_split < 1:
        raise DatasetError(f"test_split must be in [0, 1), got {test_split}.")
    indices = np.arange(len(x))
    np.random.RandomState(seed).shuffle(indices)
    if isinstance(x, torch.Tensor):
        index = torch.from_numpy(indices)
        x, y = x[index], y[index]
    else:
        x, y = np.asarray(x)[indices], np.asarray(y)[indices]
    n = int(len(x) * (1 - test_split))
    return x[:n], y[:n], x[n:], y[n:]


# ---------------------------------------------------------------------------------------------------------- load


def _check_count(spec: DatasetSpec, split: str, found: int, where: str) -> None:
    want = spec.n_train if split == "train" else spec.n_test
    if want is not None and found != want:
        raise DatasetError(f"{where} holds {found} {split} examples, expected {want} for {spec.name}. It is not the "
                           f"published file: move it away and run {_cmd(spec)}.")


def load(name: str | DatasetSpec, root=None, *, download: bool = True, verify: bool = True,
         progress: bool = True) -> dict[str, torch.Tensor]:
    """The data set as tensors (see the module docstring for the keys, dtypes and shapes).

    With verify=False (a user's own copy) neither the pinned checksums nor the published counts are checked,
    so a subset or a stand-in in the same format loads; the formats still are."""
    spec = _spec(name)
    if not verify:
        spec = dataclasses.replace(spec, n_train=None, n_test=None, n_rows=None, records_per_file=None)
    _, files = _resolve(spec, root, download, verify, progress)
    if spec.kind == "idx":
        out = {}
        for split in ("train", "test"):
            images, labels = files[f"{split}_images"], files[f"{split}_labels"]
            x, y = read_idx(images), read_idx(labels)
            if x.dim() != 3 or tuple(x.shape[1:]) != tuple(spec.image_shape):
                raise DatasetError(f"{images} holds {'labels' if x.dim() == 1 else 'data'} of shape "
                                   f"{tuple(x.shape)}, expected images of shape (N, "
                                   f"{', '.join(map(str, spec.image_shape))}). Check the file names; run "
                                   f"{_cmd(spec)}.")
            if y.dim() != 1:
                raise DatasetError(f"{labels} holds images of shape {tuple(y.shape)}, expected 1-D labels. Check "
                                   f"the file names; run {_cmd(spec)}.")
            if len(x) != len(y):
                raise DatasetError(f"{images} holds {len(x)} images but {labels} holds {len(y)} labels. One of "
                                   f"them is from another release: move both away and run {_cmd(spec)}.")
            _check_count(spec, split, len(x), str(images))
            y = y.to(torch.int64)
            _check_labels(y, spec.num_classes, str(labels))
            out[f"{split}_images"], out[f"{split}_labels"] = x, y
        return out
    if spec.kind == "cifar10":
        archive = files["archive"]
        blobs = _tar_members(archive, spec.train_members + spec.test_members, spec.records_per_file)
        out = {}
        for split, members in (("train", spec.train_members), ("test", spec.test_members)):
            x, y = _cifar_join([_cifar_record_array(blobs.pop(m), f"{archive} member {m}", spec.records_per_file)
                                for m in members])
            _check_count(spec, split, len(x), str(archive))
            out[f"{split}_images"], out[f"{split}_labels"] = x, y
        return out
    if spec.kind == "boston":
        path = files["data"]
        x, y = read_boston_csv(path) if path.suffix.lower() == ".csv" else read_boston_npz(path)
        if spec.n_rows is not None and len(x) != spec.n_rows:
            raise DatasetError(f"{path} holds {len(x)} rows, expected {spec.n_rows}. Move it away and run "
                               f"{_cmd(spec)}.")
        x_train, y_train, x_test, y_test = keras_split(x, y)
        return {"x_train": x_train, "y_train": y_train, "x_test": x_test, "y_test": y_test}
    raise DatasetError(f"Data set spec {spec.name!r} has unknown kind {spec.kind!r}; use idx, cifar10 or boston.")


# ----------------------------------------------------------------------------------------------------------- CLI


def _summary(spec: DatasetSpec, data: dict[str, torch.Tensor]) -> str:
    if spec.kind == "boston":
        return f"{len(data['x_train'])} train / {len(data['x_test'])} test rows"
    return f"{len(data['train_images'])} train / {len(data['test_images'])} test images"


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m hfrun.datasets",
                                     description="Download, verify and list hfrun's data sets.")
    sub = parser.add_subparsers(dest="command", required=True)
    for command, text in (("download", "download what is missing, then verify and parse"),
                          ("verify", "verify checksums and parse, without downloading")):
        p = sub.add_parser(command, help=text)
        p.add_argument("name", help=f"one of {', '.join(DATASETS)}, or all")
        p.add_argument("--root", default=None, help=f"data root (default: ${ENV_VAR} or ./datasets)")
        if command == "download":
            p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p = sub.add_parser("list", help="list the data sets and whether their files are present")
    p.add_argument("--root", default=None, help=f"data root (default: ${ENV_VAR} or ./datasets)")
    try:
        args = parser.parse_args(argv)
    except SystemExit as exit_:
        return int(exit_.code or 0)
    if not logging.getLogger().handlers and not log.handlers:
        logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stderr)
    root = data_root(args.root)
    try:
        if args.command == "list":
            print(f"data root: {root}")
            for spec in DATASETS.values():
                directory = root / spec.name
                absent = [f.name for f in spec.files if not _candidates(f, directory)]
                csv = next((name for name in spec.csv_names if (directory / name).is_file()), None)
                state = ("present (not yet verified)" if not absent else
                         f"{csv} present in place of {', '.join(absent)} (not yet verified)" if csv else
                         f"missing {', '.join(absent)}")
                print(f"  {spec.name:14s} {spec.title}: {directory} - {state}")
            return 0
        specs = list(DATASETS.values()) if args.name == "all" else [_spec(args.name)]
    except DatasetError as error:
        print(f"hfrun datasets error: {error}", file=sys.stderr)
        return 1
    status = 0
    for spec in specs:  # with "all", one failure does not stop the others
        try:
            data = load(spec, root, download=args.command == "download", verify=True,
                        progress=args.command == "download" and not args.no_progress)
            print(f"{spec.name}: verified, {_summary(spec, data)}, in {root / spec.name}")
        except DatasetError as error:
            print(f"hfrun datasets error: {error}", file=sys.stderr)
            status = 1
    return status


if __name__ == "__main__":
    raise SystemExit(main())
