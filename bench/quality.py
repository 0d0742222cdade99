"""Sample quality as numbers: what the eye judges in a grid of samples, measured against a judge
(`bench.classifier`, a small convnet trained on the dataset's own grey images).

Registered metrics (METRICS), run by `bench.evaluate.evaluate` when it is given the dataset
(`data=`), a cache folder for the judge (`cache_dir=`) and `quality_n > 0`:

- `fd`: Fréchet distance between the judge's penultimate features of n = min(quality_n, test
  size) samples and of all test images (FID's formula on a network of the data's own domain;
  lower is better, about 0 for two samples of one distribution), with `quality_n` = n beside it.
- `precision`, `recall`: k-nearest-neighbour manifold precision and recall (Kynkäänniemi et al.
  2019, k = 3) of the samples against the first n test images in the same features: the
  fraction of samples inside the real images' manifold, and of real images inside the samples'
  (in [0, 1], higher is better).
- `class_entropy`: entropy in nats of the judge's predicted-class histogram of the samples:
  mode coverage (log 10 = 2.303 nats when ten classes are equally common; 0 for one class).
- `cond_acc` and `cond_acc_<c>` (conditional models): the judge's accuracy on samples generated
  for requested label c, over all classes and per class (chance: 1 / number of classes).
- `probe_acc`: test accuracy of a logistic-regression probe on the encoder means, fitted on
  the training split's means: how linearly the code separates the classes.
- `classifier_acc`: the judge's own test accuracy, so each number is read beside its judge.
- `quality_seconds`: the wall-clock cost of the above, training the judge included when it was
  not yet cached (a process loads the judge and embeds the test split once, in its first trial).

Samples are likelihood means of decoder outputs for z from the model's prior (the AE's fitted
latent mixture), clamped to [0, 1]; a conditional model gets labels 0, 1, ..., C-1 in turn
(uniform), and the same samples serve `cond_acc`. They are compared with the grey test images
also in binarized studies: a mean is a grey image. Draws use a generator seeded from
evaluation's seed, so a metric's value does not depend on which other metrics ran.
"""

from __future__ import annotations

import functools
import math
import time

import torch

from bench.registry import METRICS

PR_NEIGHBOURS = 3  # k of the k-NN manifolds (Kynkäänniemi et al. 2019 use 3)
SAMPLE_SEED_OFFSET = 16  # samples use generator(seed + this), apart from the other draws


# -- the numbers, on features ----------------------------------------------------------------

def trace_sqrt_product(s1: torch.Tensor, s2: torch.Tensor) -> float:
    """tr sqrt(S1 S2) of two symmetric PSD matrices, stably: sqrt(S1) S2 sqrt(S1) is symmetric
    PSD and has the eigenvalues of S1 S2, so the trace is the sum of the square roots of its
    eigenvalues (eigh only; negative round-off clipped to 0). Exact for singular matrices too."""
    s1, s2 = s1.double(), s2.double()
    values, vectors = torch.linalg.eigh(s1)
    root = (vectors * values.clamp(min=0).sqrt()) @ vectors.T
    middle = root @ s2 @ root
    return float(torch.linalg.eigvalsh((middle + middle.T) / 2).clamp(min=0).sqrt().sum())


def gaussian_frechet_distance(mu1, s1, mu2, s2) -> float:
    """Squared Fréchet (2-Wasserstein) distance between N(mu1, S1) and N(mu2, S2):
    |mu1 - mu2|^2 + tr S1 + tr S2 - 2 tr sqrt(S1 S2)."""
    mu1, mu2 = mu1.double(), mu2.double()
    d = float(((mu1 - mu2) ** 2).sum()) + float(s1.double().trace() + s2.double().trace())
    return max(0.0, d - 2 * trace_sqrt_product(s1, s2))


def feature_statistics(f: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean and covariance (float64, unbiased) of features (N, D)."""
    f = f.double()
    return f.mean(0), torch.cov(f.T).reshape(f.shape[1], f.shape[1])


def frechet_distance(a: torch.Tensor, b: torch.Tensor) -> float:
    """Fréchet distance between the Gaussians fitted to two sets of features (N, D)."""
    return gaussian_frechet_distance(*feature_statistics(a), *feature_statistics(b))


def knn_radii(f: torch.Tensor, k: int = PR_NEIGHBOURS, chunk: int = 1000) -> torch.Tensor:
    """Distance from each row of f to its k-th nearest other row (the row itself is the 0th)."""
    return torch.cat([torch.cdist(f[i:i + chunk], f).topk(k + 1, dim=1, largest=False).values[:, k]
                      for i in range(0, len(f), chunk)])  # topk: several times faster than kthvalue


def precision_recall(real: torch.Tensor, fake: torch.Tensor, k: int = PR_NEIGHBOURS,
                     chunk: int = 1000) -> tuple[float, float]:
    """Improved precision and recall (Kynkäänniemi et al. 2019): precision is the fraction of
    fake points inside some real point's k-NN ball, recall the fraction of real points inside
    some fake point's. One pass over the fake-real distances serves both."""
    real, fake = real.float(), fake.float()
    r_real = knn_radii(real, k, chunk)
    r_fake = knn_radii(fake, k, chunk)
    fake_in = torch.zeros(len(fake), dtype=torch.bool, device=fake.device)
    real_in = torch.zeros(len(real), dtype=torch.bool, device=real.device)
    for i in range(0, len(fake), chunk):
        d = torch.cdist(fake[i:i + chunk], real)
        fake_in[i:i + chunk] = (d <= r_real).any(1)
        real_in |= (d <= r_fake[i:i + chunk, None]).any(0)
    return float(fake_in.float().mean()), float(real_in.float().mean())


def class_entropy(predicted: torch.Tensor, num_classes: int) -> float:
    """Entropy in nats of the histogram of predicted classes (0: one class; log C: uniform)."""
    p = torch.bincount(predicted.flatten().cpu(), minlength=num_classes).double()
    p = p[p > 0] / p.sum()
    return max(0.0, float(-(p * p.log()).sum()))  # 0.0, not -0.0, for one class


# -- what the metrics share within one evaluation ---------------------------------------------

def _memo(function):
    """Compute once per evaluation: the result is kept in ctx under the function's name."""
    @functools.wraps(function)
    def wrapper(model, ctx):
        key = f"quality.{function.__name__}"
        if key not in ctx:
            ctx[key] = function(model, ctx)
        return ctx[key]
    return wrapper


def _timed(metric):
    """Adds the metric's seconds to ctx's running `quality_seconds` and returns the running
    total with its values: whichever quality metric runs last leaves the whole cost."""
    @functools.wraps(metric)
    def wrapper(model, x, y, ctx):
        started = time.perf_counter()
        values = metric(model, x, y, ctx)
        ctx["quality_seconds"] = ctx.get("quality_seconds", 0.0) + time.perf_counter() - started
        return {**values, "quality_seconds": ctx["quality_seconds"]}
    return wrapper


def grey(data):
    """The grey version of a Dataset (itself unless binarized): what the judge knows."""
    if data.binarize == "none":
        return data
    from bench.data import load_dataset
    return load_dataset(data.name, "none")


# (dataset, binarize, test images, cache folder, device) -> (data, judge, test features): a worker
# loads the judge and embeds the test split once, not in every trial (0.4 s on Fashion-MNIST)
_JUDGES: dict[tuple, tuple] = {}


@_memo
def _judge(model, ctx):
    from bench.classifier import load_judge
    data = ctx["data"]
    key = (data.name, data.binarize, id(data.test.x), str(ctx["cache_dir"]), str(ctx["device"]))
    if key not in _JUDGES:
        reference = grey(data)
        judge = load_judge(reference, ctx["cache_dir"], ctx["device"])
        features, _ = judge.features_and_logits(reference.test.x.to(ctx["device"]))
        if len(_JUDGES) >= 4:
            _JUDGES.pop(next(iter(_JUDGES)))
        _JUDGES[key] = (data, judge, features)  # data kept: its test tensor's id stays its own
    _, judge, features = _JUDGES[key]
    return {"judge": judge, "features": features, "n": min(ctx["quality_n"], len(features))}


@torch.no_grad()
def generate(model, n: int, generator: torch.Generator, batch: int = 500):
    """n mean images from the prior, in [0, 1], and the labels asked for (conditional models:
    0, 1, ..., C-1 in turn; otherwise None). Uses the likelihood's mean, whatever its link."""
    device = generator.device
    labels = torch.arange(n, device=device) % model.num_classes if model.conditional else None
    images = []
    for i in range(0, n, batch):
        yb = None if labels is None else labels[i:i + batch]
        z = model.prior_sample(min(batch, n - i), generator=generator, device=device)
        images.append(model.likelihood.mean(model.decode(z, yb)).clamp(0, 1))
    return torch.cat(images), labels


@_memo
def _samples(model, ctx):
    reference = _judge(model, ctx)
    generator = torch.Generator(ctx["device"]).manual_seed(ctx["seed"] + SAMPLE_SEED_OFFSET)
    images, labels = generate(model, reference["n"], generator, ctx["batch_size"])
    features, logits = reference["judge"].features_and_logits(images)
    return {"features": features, "predicted": logits.argmax(1), "labels": labels,
            "num_classes": logits.shape[1]}


# -- the registered metrics ------------------------------------------------------------------

@METRICS.register("fd", needs=("quality",),
                  better={"fd": "lower", "quality_n": None, "classifier_acc": None,
                          "quality_seconds": "lower"},
                  unit={"fd": "squared feature distance", "quality_n": "samples",
                        "classifier_acc": "fraction", "quality_seconds": "seconds"})
@_timed
def fd_metric(model, x, y, ctx):
    """Fréchet distance of samples to test images in the judge's features (lower is better)."""
    reference, samples = _judge(model, ctx), _samples(model, ctx)
    return {"fd": frechet_distance(samples["features"], reference["features"]),
            "quality_n": float(reference["n"]),
            "classifier_acc": reference["judge"].accuracy}


@METRICS.register("precision-recall", needs=("quality",),
                  better={"precision": "higher", "recall": "higher"}, unit="fraction")
@_timed
def precision_recall_metric(model, x, y, ctx):
    """k-NN manifold precision and recall of samples against test images (higher is better)."""
    reference, samples = _judge(model, ctx), _samples(model, ctx)
    if reference["n"] <= PR_NEIGHBOURS:  # no k-th neighbour to measure a ball with
        return {"precision": math.nan, "recall": math.nan}
    real = reference["features"][:reference["n"]]
    precision, recall = precision_recall(real, samples["features"])
    return {"precision": precision, "recall": recall}


@METRICS.register("class-entropy", needs=("quality",), better={"class_entropy": "higher"}, unit="nats")
@_timed
def class_entropy_metric(model, x, y, ctx):
    """Entropy (nats) of the judge's class histogram of samples: mode coverage, log C at best."""
    samples = _samples(model, ctx)
    return {"class_entropy": class_entropy(samples["predicted"], samples["num_classes"])}


@METRICS.register("cond-acc", conditional=True, needs=("quality",), unit="fraction",
                  better={"cond_acc": "higher",  # and per class, for datasets of up to ten
                          **{f"cond_acc_{c}": "higher" for c in range(10)}})
@_timed
def cond_acc_metric(model, x, y, ctx):
    """The judge's accuracy on samples of each requested label, overall and per class."""
    samples = _samples(model, ctx)
    hit = (samples["predicted"] == samples["labels"]).double()
    out = {"cond_acc": float(hit.mean())}
    for c in range(model.num_classes):
        asked = samples["labels"] == c
        if asked.any():
            out[f"cond_acc_{c}"] = float(hit[asked].mean())
    return out


@torch.no_grad()
def encoder_means(model, x, y=None, batch: int = 500) -> torch.Tensor:
    """E_q[z|x] (the AE's code), in batches; conditional models are given the true label."""
    y = y if model.conditional else None
    return torch.cat([model.encode(x[i:i + batch], None if y is None else y[i:i + batch])[0]
                      for i in range(0, len(x), batch)])


def _train_split_as_seen(data, device):
    """The training images as the model saw them (dynamic: one fixed binarization)."""
    x = data.train.x
    if data.binarize == "dynamic":
        from bench.data import BINARIZE_SEEDS, binarize_batch
        x = binarize_batch(x, torch.Generator().manual_seed(BINARIZE_SEEDS["train"]))
    return x.to(device), data.train.y.to(device)


@METRICS.register("probe", needs=("quality",), better={"probe_acc": "higher"}, unit="fraction",
                  given_label=("probe_acc",))  # a conditional encoder is given the true label
@_timed
def probe_metric(model, x, y, ctx):
    """Test accuracy of a logistic-regression probe fitted on the training split's encoder means.

    The probe is the L2-regularised (C = 1) multinomial optimum, reached by Newton's method in
    about 8 steps. L-BFGS at its default tolerance stopped short of it and scored up to 2 of 269
    test images differently (measured on digits), while taking 1.4-2.3x longer on Fashion-MNIST."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler
    from threadpoolctl import threadpool_limits  # installed with scikit-learn

    if y is None:
        return {}
    train_x, train_y = _train_split_as_seen(ctx["data"], ctx["device"])
    fit_on = encoder_means(model, train_x, train_y, ctx["batch_size"]).double().cpu().numpy()
    test_on = encoder_means(model, x, y, ctx["batch_size"]).double().cpu().numpy()
    probe = make_pipeline(StandardScaler(), LogisticRegression(solver="newton-cholesky", max_iter=100))
    # BLAS threads as many as torch's: more than the cores made one fit 40 times slower (measured)
    with threadpool_limits(torch.get_num_threads()):
        probe.fit(fit_on, train_y.cpu().numpy())
    return {"probe_acc": float(probe.score(test_on, y.cpu().numpy()))}
