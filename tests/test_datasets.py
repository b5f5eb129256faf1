"""hfrun.datasets: download from mirrors, verify, move aside, parse. Small files in the real formats, served by a
local HTTP server; no network, no real data."""
from __future__ import annotations

import dataclasses
import gzip
import hashlib
import http.server
import io
import logging
import os
import socket
import threading
from pathlib import Path

import numpy as np
import pytest
import torch

from hfrun import datasets as ds
from hfrun.datasets import DatasetError, DatasetSpec, FileSpec
from standins import IDX_NAMES, idx_bytes, tar_gz_bytes

N_TRAIN, N_TEST = 6, 4
REFUSED = "http://127.0.0.1:1/"  # nothing listens on port 1: connection refused at once


# ------------------------------------------------------------------------------------------------ file builders


def gz(data: bytes, level: int = 9) -> bytes:
    return gzip.compress(data, compresslevel=level, mtime=0)


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def md5(data: bytes) -> str:
    return hashlib.md5(data).hexdigest()


@pytest.fixture
def mnist_like():
    """Raw IDX content per published name and the arrays it holds."""
    rng = np.random.default_rng(0)
    arrays = {"train_images": rng.integers(0, 256, (N_TRAIN, 28, 28), dtype=np.uint8),
              "train_labels": rng.integers(0, 10, N_TRAIN).astype(np.uint8),
              "test_images": rng.integers(0, 256, (N_TEST, 28, 28), dtype=np.uint8),
              "test_labels": rng.integers(0, 10, N_TEST).astype(np.uint8)}
    raw = {IDX_NAMES[role]: idx_bytes(array) for role, array in arrays.items()}
    return {"arrays": arrays, "names": IDX_NAMES, "raw": raw}


def idx_spec(data, mirrors, *, content=True, md5s=True, name="tiny") -> DatasetSpec:
    files = tuple(FileSpec(f"{stem}.gz", tuple(m + f"{stem}.gz" for m in mirrors), role,
                           md5=md5(gz(data["raw"][stem])) if md5s else None,
                           content_sha256=sha256(data["raw"][stem]) if content else None)
                  for role, stem in data["names"].items())
    return DatasetSpec(name, "idx", files, n_train=N_TRAIN, n_test=N_TEST)


# ------------------------------------------------------------------------------------------------------ server


class Handler(http.server.BaseHTTPRequestHandler):
    routes: dict = {}
    hits: list = []

    def do_GET(self):  # noqa: N802
        self.hits.append(self.path)
        mode, body = self.routes.get(self.path, ("404", b""))
        if mode == "404":
            self.send_error(404)
            return
        self.send_response(200)
        self.send_header("Content-Type", "application/octet-stream")
        if mode == "drop":  # promise the whole file, send half of it, hang up
            self.send_header("Content-Length", str(len(body) + 1000))
            self.end_headers()
            self.wfile.write(body[: len(body) // 2])
            self.wfile.flush()
            self.connection.shutdown(socket.SHUT_RDWR)
            self.close_connection = True
            return
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args):
        pass


@pytest.fixture
def server(monkeypatch):
    for var in ("http_proxy", "HTTP_PROXY", "https_proxy", "HTTPS_PROXY", "all_proxy", "ALL_PROXY"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("no_proxy", "*")
    handler = type("H", (Handler,), {"routes": {}, "hits": []})
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    base = f"http://127.0.0.1:{httpd.server_address[1]}"
    try:
        yield base, handler
    finally:
        httpd.shutdown()
        httpd.server_close()


def serve(handler, base, prefix, files: dict[str, bytes], mode="ok"):
    for name, body in files.items():
        handler.routes[f"/{prefix}/{name}"] = (mode, body)
    return f"{base}/{prefix}/"


def check_idx(out, data):
    for role, array in data["arrays"].items():
        assert out[role].dtype == (torch.uint8 if role.endswith("images") else torch.int64)
        assert np.array_equal(out[role].numpy(), array)


def leftovers(directory: Path):
    return [p.name for p in directory.iterdir() if p.name.startswith(".")]


# ------------------------------------------------------------------------------------------------------- tests


def test_download_skips_404_corrupt_and_dropped_mirrors_then_verifies_and_parses(tmp_path, server, mnist_like):
    base, handler = server
    good = {f"{s}.gz": gz(r) for s, r in mnist_like["raw"].items()}
    corrupt = {n: gz(b"\0" * 40) for n in good}
    mirrors = [base + "/missing/", serve(handler, base, "corrupt", corrupt),
               serve(handler, base, "drop", good, mode="drop"), serve(handler, base, "good", good)]
    spec = idx_spec(mnist_like, mirrors)
    out = ds.load(spec, tmp_path, progress=True)
    check_idx(out, mnist_like)
    directory = tmp_path / "tiny"
    assert sorted(p.name for p in directory.glob("*.gz")) == sorted(good)
    assert not leftovers(directory) and not list(directory.glob("*.corrupt*"))
    for name, body in good.items():  # the good copy, never the corrupt or half one
        assert (directory / name).read_bytes() == body
    assert [h.split("/")[1] for h in handler.hits[:4]] == ["missing", "corrupt", "drop", "good"]
    # Everything present and verified: no request at all the second time, even with nothing served.
    handler.routes.clear()
    before = len(handler.hits)
    check_idx(ds.load(spec, tmp_path, progress=False), mnist_like)
    assert ds.ensure(spec, tmp_path) == directory
    assert len(handler.hits) == before


def test_all_mirrors_fail_one_paragraph_naming_files_urls_and_directory(tmp_path, server, mnist_like):
    base, handler = server
    good = {f"{s}.gz": gz(r) for s, r in mnist_like["raw"].items()}
    drop = serve(handler, base, "drop", good, mode="drop")
    spec = idx_spec(mnist_like, [REFUSED, base + "/gone/", drop])
    with pytest.raises(DatasetError) as caught:
        ds.load(spec, tmp_path, progress=False)
    message = str(caught.value)
    assert "\n" not in message
    for name in good:
        assert name in message
        assert f"{base}/gone/{name} (HTTP 404" in message
        assert f"{drop}{name} (the connection dropped" in message
        assert f"{REFUSED}{name}" in message
    assert "could not connect" in message and "skipped" in message  # a refused host is not retried per file
    assert str(tmp_path / "tiny") in message and "python -m hfrun.datasets download tiny" in message
    assert not leftovers(tmp_path / "tiny") and not list((tmp_path / "tiny").glob("*.gz"))


def test_offline_without_download_says_what_to_fetch_and_where(tmp_path, mnist_like):
    spec = idx_spec(mnist_like, ["https://example.invalid/a/", "https://example.invalid/b/"])
    with pytest.raises(DatasetError) as caught:
        ds.ensure(spec, tmp_path, download=False)
    message = str(caught.value)
    assert "missing and downloading is off" in message
    assert "https://example.invalid/a/train-images-idx3-ubyte.gz or https://example.invalid/b/" in message
    assert f"{tmp_path / 'tiny'}/" in message and "download tiny" in message


def test_corrupt_present_file_is_moved_aside_never_deleted_then_fetched_again(tmp_path, server, mnist_like):
    base, handler = server
    good = {f"{s}.gz": gz(r) for s, r in mnist_like["raw"].items()}
    spec = idx_spec(mnist_like, [serve(handler, base, "good", good)])
    directory = tmp_path / "tiny"
    directory.mkdir()
    for name, body in good.items():
        (directory / name).write_bytes(body)
    target = directory / "t10k-labels-idx1-ubyte.gz"
    target.write_bytes(b"mine, first")
    (directory / "t10k-labels-idx1-ubyte.gz.corrupt").write_bytes(b"older")
    with pytest.raises(DatasetError) as caught:
        ds.ensure(spec, tmp_path, download=False)
    message = str(caught.value)
    assert "t10k-labels-idx1-ubyte.gz" in message and "moved aside to t10k-labels-idx1-ubyte.gz.corrupt-2" in message
    assert "nothing was deleted" in message
    assert (directory / "t10k-labels-idx1-ubyte.gz.corrupt").read_bytes() == b"older"
    assert (directory / "t10k-labels-idx1-ubyte.gz.corrupt-2").read_bytes() == b"mine, first"
    assert not target.exists()
    assert handler.hits == []
    # With downloads on, only the moved file is fetched.
    check_idx(ds.load(spec, tmp_path, progress=False), mnist_like)
    assert handler.hits == ["/good/t10k-labels-idx1-ubyte.gz"]
    assert target.read_bytes() == good[target.name]


def test_raw_and_recompressed_files_verify_by_content_hash(tmp_path, mnist_like):
    spec = idx_spec(mnist_like, [REFUSED])
    directory = tmp_path / "tiny"
    directory.mkdir()
    stems = list(mnist_like["raw"])
    (directory / stems[0]).write_bytes(mnist_like["raw"][stems[0]])  # raw
    (directory / stems[1]).write_bytes(mnist_like["raw"][stems[1]])
    for stem in stems[2:]:  # re-compressed: different .gz bytes, same content
        body = gz(mnist_like["raw"][stem], level=1) + b""
        assert md5(body) != md5(gz(mnist_like["raw"][stem]))
        (directory / f"{stem}.gz").write_bytes(body)
    check_idx(ds.load(spec, tmp_path, download=False), mnist_like)


def test_md5_only_pin_cannot_check_a_raw_copy(tmp_path, mnist_like, caplog):
    spec = idx_spec(mnist_like, [REFUSED], content=False)  # like Fashion-MNIST: only the .gz MD5s are known
    directory = tmp_path / "tiny"
    directory.mkdir()
    for stem, raw in mnist_like["raw"].items():
        (directory / stem).write_bytes(raw)
    with pytest.raises(DatasetError) as caught:
        ds.load(spec, tmp_path, download=False)
    message = str(caught.value)
    assert "cannot be checked" in message and "verify=false" in message and "official" in message
    assert all((directory / stem).exists() for stem in mnist_like["raw"])  # not moved: it may well be fine
    with caplog.at_level(logging.WARNING, logger="hfrun.datasets"):
        check_idx(ds.load(spec, tmp_path, download=False, verify=False), mnist_like)
    warned = " ".join(r.getMessage() for r in caplog.records)
    assert all(stem in warned for stem in mnist_like["raw"]) and "without verification" in warned


def write_gzipped_copy(tmp_path: Path, mnist_like) -> Path:
    """The stand-in's four files, gzipped, in tmp_path/tiny (the spec's directory)."""
    directory = tmp_path / "tiny"
    directory.mkdir()
    for stem, raw in mnist_like["raw"].items():
        (directory / f"{stem}.gz").write_bytes(gz(raw))
    return directory


def test_verify_false_uses_a_mismatching_copy_with_a_warning(tmp_path, mnist_like, caplog):
    spec, directory = idx_spec(mnist_like, [REFUSED]), write_gzipped_copy(tmp_path, mnist_like)
    mine = mnist_like["arrays"]["train_images"].copy()
    mine[0, 0, 0] ^= 0xFF
    (directory / "train-images-idx3-ubyte.gz").write_bytes(gz(idx_bytes(mine)))
    with caplog.at_level(logging.WARNING, logger="hfrun.datasets"):
        out = ds.load(spec, tmp_path, download=False, verify=False)
    assert np.array_equal(out["train_images"].numpy(), mine)
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and "train-images-idx3-ubyte.gz" in warnings[0]
    assert (directory / "train-images-idx3-ubyte.gz").exists()


def test_hashes_are_cached_until_the_file_changes(tmp_path, mnist_like, monkeypatch):
    spec, directory = idx_spec(mnist_like, [REFUSED]), write_gzipped_copy(tmp_path, mnist_like)
    calls = []
    real = ds._digests
    monkeypatch.setattr(ds, "_digests", lambda path, gz_member: calls.append(path.name) or real(path, gz_member))
    ds.ensure(spec, tmp_path, download=False)
    assert len(calls) == 4 and len(list(directory.glob("*.verified"))) == 4
    ds.ensure(spec, tmp_path, download=False)
    assert len(calls) == 4
    target = directory / "train-labels-idx1-ubyte.gz"
    os.utime(target, ns=(0, target.stat().st_mtime_ns + 10**9))
    ds.ensure(spec, tmp_path, download=False)
    assert calls[4:] == [target.name]


def test_data_root_precedence(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("HFRUN_DATASETS", raising=False)
    assert ds.data_root() == tmp_path / "datasets"
    monkeypatch.setenv("HFRUN_DATASETS", str(tmp_path / "env"))
    assert ds.data_root() == tmp_path / "env"
    assert ds.data_root(tmp_path / "cfg") == tmp_path / "cfg"
    assert ds.data_root("rel") == tmp_path / "rel"
    spec = DatasetSpec("x", "idx", ())
    assert ds.ensure(spec) == tmp_path / "env" / "x"
    assert ds.ensure(spec, "cfg") == tmp_path / "cfg" / "x"


def test_unknown_name():
    with pytest.raises(DatasetError, match="Known data sets: mnist, fashion_mnist, cifar10, boston"):
        ds.load("imagenet")


def test_registry_pins():
    mnist = ds.DATASETS["mnist"]
    assert mnist.file("train_images").content_sha256 == (
        "ba891046e6505d7aadcbbe25680a0738ad16aec93bde7f9b65e87a2fc25776db")
    assert mnist.file("train_images").urls[0] == "https://ossci-datasets.s3.amazonaws.com/mnist/train-images-idx3-ubyte.gz"
    assert all(f.md5 and not f.content_sha256 for f in ds.DATASETS["fashion_mnist"].files)
    cifar = ds.DATASETS["cifar10"].file("archive")
    assert cifar.name == "cifar-10-binary.tar.gz" and "python" not in cifar.urls[0]
    assert ds.DATASETS["boston"].file("data").sha256.startswith("f553886a")


# ----------------------------------------------------------------------------------------------------- parsers


def test_read_idx_gz_and_raw(tmp_path, mnist_like):
    raw = mnist_like["raw"]["train-images-idx3-ubyte"]
    (tmp_path / "a").write_bytes(raw)
    (tmp_path / "a.gz").write_bytes(gz(raw))
    for name in ("a", "a.gz"):
        images = ds.read_idx(tmp_path / name)
        assert images.dtype == torch.uint8 and images.shape == (N_TRAIN, 28, 28)
        assert np.array_equal(images.numpy(), mnist_like["arrays"]["train_images"])
    labels = ds.read_idx(_write(tmp_path / "l", mnist_like["raw"]["train-labels-idx1-ubyte"]))
    assert labels.shape == (N_TRAIN,)


def _write(path: Path, data: bytes) -> Path:
    path.write_bytes(data)
    return path


@pytest.mark.parametrize("mutate, expected", [
    (lambda b: b[:-5], "truncated"),
    (lambda b: b + b"\0", "longer than its header says"),
    (lambda b: (0x0802).to_bytes(4, "big") + b[4:], "magic number is 0x00000802"),
    (lambda b: b[:10], "truncated"),
    (lambda b: b[:3], "only 3 bytes"),
])
def test_read_idx_errors_name_the_file(tmp_path, mnist_like, mutate, expected):
    path = _write(tmp_path / "bad-idx3-ubyte", mutate(mnist_like["raw"]["train-images-idx3-ubyte"]))
    with pytest.raises(DatasetError, match=expected) as caught:
        ds.read_idx(path)
    assert str(path) in str(caught.value)


def test_truncated_gzip_is_a_dataset_error(tmp_path, mnist_like):
    path = _write(tmp_path / "x.gz", gz(mnist_like["raw"]["train-images-idx3-ubyte"])[:-20])
    with pytest.raises(DatasetError, match="could not be read") as caught:
        ds.read_idx(path)
    assert str(path) in str(caught.value)


def test_label_out_of_range_and_mismatched_counts(tmp_path, mnist_like):
    spec = idx_spec(mnist_like, [REFUSED], content=False, md5s=False)  # unpinned: parse checks only
    directory = tmp_path / "tiny"
    directory.mkdir()
    for stem, raw in mnist_like["raw"].items():
        (directory / stem).write_bytes(raw)
    labels = mnist_like["arrays"]["test_labels"].copy()
    labels[2] = 10
    (directory / "t10k-labels-idx1-ubyte").write_bytes(idx_bytes(labels))
    with pytest.raises(DatasetError, match=r"label 10 at index 2; labels must be 0\.\.9") as caught:
        ds.load(spec, tmp_path, download=False)
    assert "t10k-labels-idx1-ubyte" in str(caught.value)
    (directory / "t10k-labels-idx1-ubyte").write_bytes(idx_bytes(labels[:3] % 10))
    with pytest.raises(DatasetError, match="holds 4 images but .* holds 3 labels"):
        ds.load(spec, tmp_path, download=False)


def cifar_records(rng, n):
    labels = rng.integers(0, 10, n).astype(np.uint8)
    pixels = rng.integers(0, 256, (n, 3, 32, 32), dtype=np.uint8)
    data = np.concatenate([labels[:, None], pixels.reshape(n, -1)], axis=1).tobytes()
    return data, pixels, labels


@pytest.fixture
def cifar_like():
    rng = np.random.default_rng(1)
    train = [cifar_records(rng, 3), cifar_records(rng, 3)]
    test = cifar_records(rng, 3)
    members = {"cifar-10-batches-bin/data_batch_1.bin": train[0][0], "cifar-10-batches-bin/data_batch_2.bin":
               train[1][0], "cifar-10-batches-bin/test_batch.bin": test[0]}
    return {"members": members, "archive": tar_gz_bytes({**members, "cifar-10-batches-bin/readme.html": b"hi"}),
            "train": train, "test": test}


def cifar_spec(archive: bytes, urls) -> DatasetSpec:
    return dataclasses.replace(
        ds.DATASETS["cifar10"], name="tinycifar", n_train=6, n_test=3, records_per_file=3,
        train_members=("cifar-10-batches-bin/data_batch_1.bin", "cifar-10-batches-bin/data_batch_2.bin"),
        files=(FileSpec("cifar-10-binary.tar.gz", tuple(urls), "archive", md5=md5(archive)),))


def test_cifar_download_and_parse(tmp_path, server, cifar_like):
    base, handler = server
    archive = cifar_like["archive"]
    bad = bytearray(archive)
    bad[len(bad) // 2] ^= 1
    urls = [serve(handler, base, "bad", {"cifar-10-binary.tar.gz": bytes(bad)}) + "cifar-10-binary.tar.gz",
            serve(handler, base, "good", {"cifar-10-binary.tar.gz": archive}) + "cifar-10-binary.tar.gz"]
    out = ds.load(cifar_spec(archive, urls), tmp_path, progress=False)
    assert out["train_images"].dtype == torch.uint8 and out["train_images"].shape == (6, 3, 32, 32)
    assert out["test_images"].shape == (3, 3, 32, 32) and out["test_labels"].dtype == torch.int64
    (a, pa, la), (b, pb, lb) = cifar_like["train"]
    assert np.array_equal(out["train_images"].numpy(), np.concatenate([pa, pb]))
    assert np.array_equal(out["train_labels"].numpy(), np.concatenate([la, lb]))
    assert np.array_equal(out["test_images"].numpy(), cifar_like["test"][1])
    # Layout: byte 1 + 0 is red (0, 0), byte 1 + 1024 is green (0, 0), byte 1 + 33 is red (1, 1).
    first = np.frombuffer(a, np.uint8)
    image = out["train_images"][0].numpy()
    assert image[0, 0, 0] == first[1] and image[1, 0, 0] == first[1 + 1024] and image[0, 1, 1] == first[1 + 33]
    assert [p.name for p in (tmp_path / "tinycifar").iterdir() if not p.name.endswith(".verified")] == [
        "cifar-10-binary.tar.gz"]  # nothing extracted to disk


def test_cifar_bin_files_and_errors(tmp_path, cifar_like):
    paths = []
    for name, body in cifar_like["members"].items():
        paths.append(_write(tmp_path / Path(name).name, body))
    images, labels = ds.read_cifar_batches(paths[:2], records_per_file=3)
    assert images.shape == (6, 3, 32, 32) and labels.shape == (6,)
    with pytest.raises(DatasetError, match="expected 4 records of 3073 bytes") as caught:
        ds.read_cifar_batches(paths[:1], records_per_file=4)
    assert paths[0].name in str(caught.value)
    bad = bytearray(cifar_like["members"]["cifar-10-batches-bin/test_batch.bin"])
    bad[3073] = 10  # the second record's label
    with pytest.raises(DatasetError, match="record 1 has label 10"):
        ds.read_cifar_batches([_write(tmp_path / "bad.bin", bytes(bad))], records_per_file=3)
    archive = _write(tmp_path / "a.tar.gz", cifar_like["archive"])
    with pytest.raises(DatasetError, match="lacks cifar-10-batches-bin/data_batch_3.bin"):
        ds.read_cifar_batches(archive, members=["cifar-10-batches-bin/data_batch_3.bin"], records_per_file=3)
    with pytest.raises(DatasetError, match="holds 9219 bytes, expected 2 records"):
        ds.read_cifar_batches(archive, members=["cifar-10-batches-bin/test_batch.bin"], records_per_file=2)
    truncated = _write(tmp_path / "t.tar.gz", cifar_like["archive"][:-200])
    with pytest.raises(DatasetError, match="t.tar.gz") as caught:
        ds.read_cifar_batches(truncated, members=["cifar-10-batches-bin/test_batch.bin"], records_per_file=3)
    assert "download cifar10" in str(caught.value)


# ------------------------------------------------------------------------------------------------------ boston


def boston_arrays(n=20, seed=2):
    rng = np.random.default_rng(seed)
    return rng.normal(size=(n, 13)).round(4), rng.uniform(5, 50, n).round(1)


def npz_bytes(**arrays) -> bytes:
    buffer = io.BytesIO()
    np.savez(buffer, **arrays)
    return buffer.getvalue()


def csv_text(x, y) -> str:
    lines = [",".join(f'"{c}"' for c in ds.BOSTON_COLUMNS)]
    lines += [",".join(repr(float(v)) for v in (*row, target)) for row, target in zip(x, y)]
    return "\n".join(lines) + "\n"


def test_keras_split_matches_a_hand_computation():
    x, y = boston_arrays(506)
    x_train, y_train, x_test, y_test = ds.keras_split(torch.from_numpy(x), torch.from_numpy(y))
    assert (len(x_train), len(x_test)) == (404, 102)
    order = np.arange(506)
    np.random.RandomState(113).shuffle(order)
    assert np.array_equal(x_train.numpy(), x[order[:404]]) and np.array_equal(y_test.numpy(), y[order[404:]])
    a, b, c, d = ds.keras_split(x, y, seed=1, test_split=0.5)
    assert len(a) == len(c) == 253 and isinstance(a, np.ndarray)


def test_boston_npz_download_and_split(tmp_path, server):
    base, handler = server
    x, y = boston_arrays()
    body = npz_bytes(x=x, y=y)
    url = serve(handler, base, "k", {"boston_housing.npz": body}) + "boston_housing.npz"
    spec = dataclasses.replace(ds.DATASETS["boston"], name="tinyboston", n_rows=20,
                               files=(FileSpec("boston_housing.npz", (url,), "data", sha256=sha256(body)),))
    out = ds.load(spec, tmp_path, progress=False)
    expected = ds.keras_split(x, y)
    assert out["x_train"].shape == (16, 13) and out["x_test"].shape == (4, 13)
    assert out["x_train"].dtype == torch.float64
    for key, want in zip(("x_train", "y_train", "x_test", "y_test"), expected):
        assert np.array_equal(out[key].numpy(), want)


def test_boston_csv_used_in_place_of_npz_when_its_values_match(tmp_path, caplog):
    x, y = boston_arrays()
    pin = ds._boston_values_sha256(torch.from_numpy(x), torch.from_numpy(y))
    spec = dataclasses.replace(ds.DATASETS["boston"], name="tinyboston", n_rows=20, csv_values_sha256=pin,
                               files=(FileSpec("boston_housing.npz", (REFUSED,), "data", sha256="0" * 64),))
    (tmp_path / "tinyboston").mkdir()
    csv = tmp_path / "tinyboston" / "boston_house_prices.csv"
    csv.write_text("20,13,,,\n" + csv_text(x, y))  # scikit-learn's copy starts with a count line
    out = ds.load(spec, tmp_path, download=False)
    assert np.array_equal(out["y_test"].numpy(), ds.keras_split(x, y)[3])
    x[0, 0] += 1
    csv.write_text(csv_text(x, y))
    with pytest.raises(DatasetError, match="parsed values") as caught:
        ds.load(spec, tmp_path, download=False)
    assert "boston_housing.npz" in str(caught.value) and csv.exists()
    with caplog.at_level(logging.WARNING, logger="hfrun.datasets"):
        ds.load(spec, tmp_path, download=False, verify=False)
    assert "boston_house_prices.csv" in caplog.text


@pytest.mark.parametrize("text, expected", [
    ("CRIM,ZN\n1,2\n", "the header is CRIM,ZN"),
    ("{header}\n" + ",".join(["1"] * 13) + "\n", "line 2: 13 fields, expected 14"),
    ("{header}\n" + ",".join(["1"] * 13 + ["NA"]) + "\n", "line 2: 'NA' is not a number"),
    ("", "is empty"),
])
def test_boston_csv_errors(tmp_path, text, expected):
    path = _write(tmp_path / "b.csv", text.replace("{header}", ",".join(ds.BOSTON_COLUMNS)).encode())
    with pytest.raises(DatasetError, match=expected) as caught:
        ds.read_boston_csv(path)
    assert str(path) in str(caught.value)


def test_boston_npz_errors(tmp_path):
    x, y = boston_arrays()
    cases = {"nokey.npz": npz_bytes(x=x), "shape.npz": npz_bytes(x=x[:, :12], y=y),
             "pickle.npz": npz_bytes(x=np.array([{"a": 1}], dtype=object), y=y), "junk.npz": b"PK not a zip"}
    for name, expected in (("nokey.npz", "lacks array"), ("shape.npz", r"\(rows, 13\)"),
                           ("pickle.npz", "plain numeric arrays"), ("junk.npz", "could not be read")):
        path = _write(tmp_path / name, cases[name])
        with pytest.raises(DatasetError, match=expected) as caught:
            ds.read_boston_npz(path)
        assert str(path) in str(caught.value)


# --------------------------------------------------------------------------------------------------------- CLI


def test_cli_download_verify_list(tmp_path, server, mnist_like, monkeypatch, capsys):
    base, handler = server
    good = {f"{s}.gz": gz(r) for s, r in mnist_like["raw"].items()}
    spec = idx_spec(mnist_like, [serve(handler, base, "good", good)], name="mnist")
    monkeypatch.setitem(ds.DATASETS, "mnist", spec)
    assert ds.main(["verify", "mnist", "--root", str(tmp_path)]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "python -m hfrun.datasets download mnist" in err
    assert ds.main(["download", "mnist", "--root", str(tmp_path), "--no-progress"]) == 0
    out = capsys.readouterr().out
    assert f"mnist: verified, {N_TRAIN} train / {N_TEST} test images, in {tmp_path / 'mnist'}" in out
    assert ds.main(["verify", "mnist", "--root", str(tmp_path)]) == 0
    assert ds.main(["list", "--root", str(tmp_path)]) == 0
    listing = capsys.readouterr().out
    assert all(name in listing for name in ("mnist", "fashion_mnist", "cifar10", "boston"))
    assert ds.main(["verify", "nope"]) == 1
    assert ds.main(["frobnicate"]) == 2


def test_list_names_a_boston_csv_in_place_of_the_npz(tmp_path, capsys):
    (tmp_path / "boston").mkdir()
    (tmp_path / "boston" / "boston_house_prices.csv").write_text("CRIM\n")
    assert ds.main(["list", "--root", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "boston_house_prices.csv present in place of boston_housing.npz" in out
    assert "missing cifar-10-binary.tar.gz" in out
