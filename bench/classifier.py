"""The judge of sample quality: a small convolutional classifier per dataset, trained once on the
grey training images and cached as a state dict with its accuracy beside it.

Its penultimate features are the space in which `bench.quality` measures Fréchet distance and
precision/recall, and its predictions give label accuracy and mode coverage: the FID recipe on a
network of the data's own domain (no pretrained weights are needed, or downloaded).

It is trained on grey images only, whatever binarization a study uses: every model's samples are
likelihood means (pixel probabilities for a Bernoulli), which live in grey space, and they are
compared with the grey test images. Besides the data it is shown junk (flat grey, noise,
shuffled pixels) as one extra class, so that its features keep what is no image of the data
apart from the data; its predictions are always one of the data's classes.

The cache key is the dataset and `CLASSIFIER_VERSION`, a hash of this file's definitions and
hyperparameters, so a change to either trains a new judge.

Files under the cache folder (`<results>/cache/`):
`classifier-<dataset>-<version>.pt` (state dict, loaded with weights_only=True) and `.json`
(test and validation accuracy, training seconds, epochs, device).
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import inspect
import json
import math
import os
import pickle
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

# Training budget: about `examples` images seen, between min_epochs and max_epochs passes;
# `junk` extra images of no class per batch of `batch_size` (see `junk_images`).
HYPERPARAMETERS = {"channels": (32, 64), "width": 128, "dropout": 0.3, "lr": 2e-3,
                   "batch_size": 128, "junk": 16, "examples": 300_000, "min_epochs": 3,
                   "max_epochs": 20, "seed": 0}


class Classifier(nn.Module):
    """Two 3x3 convolutions with BatchNorm and ReLU (stride 2 while the image is at least 8
    pixels high and wide), a ReLU layer of `width` features (the judge's feature space) and a
    linear head over the classes plus one "no class" output. 28x28 images shrink to 14x14 and
    7x7, 8x8 digits to 4x4."""

    def __init__(self, image_shape: tuple[int, int, int], num_classes: int, channels=(32, 64),
                 width: int = 128, dropout: float = 0.3):
        super().__init__()
        c, h, w = image_shape
        layers: list[nn.Module] = []
        for out in channels:
            stride = 2 if min(h, w) >= 8 else 1
            layers += [nn.Conv2d(c, out, 3, stride=stride, padding=1), nn.BatchNorm2d(out), nn.ReLU()]
            c, h, w = out, (h - 1) // stride + 1, (w - 1) // stride + 1
        self.conv = nn.Sequential(*layers, nn.Flatten())
        self.features = nn.Sequential(nn.Linear(c * h * w, width), nn.ReLU())
        self.head = nn.Sequential(nn.Dropout(dropout), nn.Linear(width, num_classes + 1))
        self.num_classes = num_classes

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        """Penultimate features (B, width)."""
        return self.features(self.conv(x))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Logits of the data's classes and, last, of "no class"."""
        return self.head(self.embed(x))


def junk_images(like: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Images that are no data at all, as many as `like` holds: a flat grey level with noise of
    random strength, uniform noise, and `like`'s own pixels shuffled (the data's grey levels
    without its shapes). Trained as one extra class, they keep such images apart from the data
    in the judge's features: without them a flat grey image (an untrained decoder's output)
    lands amid the real images and counts as precise."""
    n, device = len(like), like.device
    rand = functools.partial(torch.rand, generator=generator, device=device)
    level, strength = rand(n, 1, 1, 1), 0.3 * rand(n, 1, 1, 1)
    flat = level + strength * torch.randn(like.shape, generator=generator, device=device)
    noise = rand(like.shape)
    order = torch.argsort(rand(n, like[0].numel()), dim=1)
    shuffled = like.flatten(1).gather(1, order).view_as(like)
    kind = torch.randint(0, 3, (n, 1, 1, 1), generator=generator, device=device)
    return torch.where(kind == 0, flat, torch.where(kind == 1, noise, shuffled)).clamp(0, 1)


def _version() -> str:
    source = "".join(inspect.getsource(f) for f in (Classifier, junk_images, train_classifier))
    text = source + json.dumps(HYPERPARAMETERS, sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()[:12]


@dataclass
class Judge:
    """A trained classifier of one dataset and what is known about it."""

    classifier: Classifier
    info: dict  # dataset, version, test_accuracy, val_accuracy, train_seconds, epochs, device

    @property
    def accuracy(self) -> float:
        return self.info["test_accuracy"]

    @torch.no_grad()
    def features_and_logits(self, x: torch.Tensor, batch: int = 1000) -> tuple[torch.Tensor, torch.Tensor]:
        """Penultimate features and the logits of the data's classes (without "no class": a
        prediction is always one of the dataset's classes) of images x in [0, 1], in batches."""
        feats, logits = [], []
        for i in range(0, len(x), batch):
            f = self.classifier.embed(x[i:i + batch])
            feats.append(f)
            logits.append(self.classifier.head(f)[:, :self.classifier.num_classes])
        return torch.cat(feats), torch.cat(logits)


@torch.no_grad()
def accuracy(classifier: Classifier, x: torch.Tensor, y: torch.Tensor, batch: int = 1000) -> float:
    """The fraction of images x whose most likely data class (never "no class") is y."""
    was_training = classifier.training
    classifier.eval()
    correct = sum(int((classifier(x[i:i + batch])[:, :classifier.num_classes].argmax(1)
                       == y[i:i + batch]).sum()) for i in range(0, len(x), batch))
    classifier.train(was_training)
    return correct / max(1, len(x))


@torch.enable_grad()  # also when called inside an evaluation's no_grad
def train_classifier(data, device: str | torch.device = "cpu") -> Judge:
    """Train the judge on `data` (a grey bench.data.Dataset) and junk images: Adam with a
    one-cycle learning rate, a fixed seed; the global random state is untouched."""
    hp = HYPERPARAMETERS
    device = torch.device(device)
    x, y = data.train.x.to(device), data.train.y.to(device)
    n, bs = len(x), hp["batch_size"]
    epochs = min(hp["max_epochs"], max(hp["min_epochs"], math.ceil(hp["examples"] / n)))
    steps = epochs * math.ceil(n / bs)
    started = time.perf_counter()
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        torch.manual_seed(hp["seed"])
        model = Classifier(data.image_shape, data.num_classes, hp["channels"], hp["width"],
                           hp["dropout"]).to(device)
        gen = torch.Generator(device).manual_seed(hp["seed"])
        optimizer = torch.optim.Adam(model.parameters(), lr=hp["lr"])
        schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, hp["lr"], total_steps=steps,
                                                       pct_start=0.15)
        junk_label = torch.full((hp["junk"],), data.num_classes, device=device)
        model.train()
        for _ in range(epochs):
            perm = torch.randperm(n, generator=gen, device=device)
            for i in range(0, n, bs):
                idx = perm[i:i + bs]
                junk = junk_images(x[idx[:hp["junk"]]], gen)
                loss = F.cross_entropy(model(torch.cat([x[idx], junk])),
                                       torch.cat([y[idx], junk_label[:len(junk)]]))
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                schedule.step()
    model.eval()
    info = {"dataset": data.name, "version": CLASSIFIER_VERSION,
            "test_accuracy": accuracy(model, data.test.x.to(device), data.test.y.to(device)),
            "val_accuracy": accuracy(model, data.val.x.to(device), data.val.y.to(device)),
            "train_seconds": time.perf_counter() - started, "epochs": epochs,
            "train_images": n, "device": str(device)}
    return Judge(model, info)


def cache_paths(cache_dir: str | os.PathLike, dataset: str) -> tuple[Path, Path]:
    stem = Path(cache_dir) / f"classifier-{dataset}-{CLASSIFIER_VERSION}"
    return stem.with_suffix(".pt"), stem.with_suffix(".json")


def load_judge(data, cache_dir: str | os.PathLike, device: str | torch.device = "cpu") -> Judge:
    """The cached judge of `data` (a grey Dataset), training and caching it first if there is
    none. Concurrent workers wait on a lock file, so one trains and the others load."""
    weights, meta = cache_paths(cache_dir, data.name)
    weights.parent.mkdir(parents=True, exist_ok=True)
    with _locked(weights.with_suffix(".lock")):
        if weights.is_file() and meta.is_file():
            try:
                return _load(data, weights, meta, device)
            except (OSError, RuntimeError, ValueError, EOFError, pickle.UnpicklingError):
                pass  # a damaged cache entry: train it again below, replacing it
        judge = train_classifier(data, device)
        state = {k: v.cpu() for k, v in judge.classifier.state_dict().items()}
        _write_atomically(weights, lambda f: torch.save(state, f))
        _write_atomically(meta, lambda f: f.write(json.dumps(judge.info, indent=2).encode()))
        return judge


def _load(data, weights: Path, meta: Path, device) -> Judge:
    hp = HYPERPARAMETERS
    info = json.loads(meta.read_text())
    model = Classifier(data.image_shape, data.num_classes, hp["channels"], hp["width"], hp["dropout"])
    model.load_state_dict(torch.load(weights, map_location="cpu", weights_only=True))
    return Judge(model.to(device).eval(), info)


def _write_atomically(path: Path, write) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".part")
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


@contextlib.contextmanager
def _locked(path: Path):
    try:
        import fcntl
    except ImportError:  # no flock (Windows): concurrent workers may each train one
        yield
        return
    with open(path, "w") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


CLASSIFIER_VERSION = _version()  # the cache key: a hash of the definitions above and HYPERPARAMETERS
