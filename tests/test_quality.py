"""Sample-quality metrics against known answers.

The numbers first (Fréchet distance of Gaussians in closed form, precision/recall and class
entropy of constructed point sets), then the judge and the metrics on the digits dataset:
two halves of the test set are close and noise is far, noise added to real images moves
them away monotonically, a generator of one class covers no modes, a CVAE that ignores its
label is at chance, and a trained model beats an untrained one on every metric.
"""

import json
import math

import numpy as np
import pytest
import scipy.linalg
import torch
from torch import nn

import bench.classifier
from bench.classifier import CLASSIFIER_VERSION, Classifier, cache_paths, load_judge
from bench.config import RunConfig
from bench.data import load_dataset
from bench.errors import ConfigError
from bench.evaluate import evaluate
from bench.losses import FixedGaussian
from bench.models import create_model
from bench.quality import (class_entropy, frechet_distance, gaussian_frechet_distance,
                           precision_recall, trace_sqrt_product)
from bench.train import fit

F64 = torch.float64
SAMPLE_METRICS = ["fd", "precision-recall", "class-entropy", "cond-acc"]

pytestmark = pytest.mark.usefixtures("one_thread")


def seeded(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def random_rotation(d: int, seed: int) -> torch.Tensor:
    q, _ = torch.linalg.qr(torch.randn(d, d, generator=seeded(seed), dtype=F64))
    return q


# -- Fréchet distance: the matrix square root against closed forms ---------------------------

def test_trace_sqrt_product_of_commuting_covariances_is_exact():
    """S1 = Q diag(a) Q^T and S2 = Q diag(b) Q^T commute: tr sqrt(S1 S2) = sum sqrt(a b),
    also when both are singular (the zeros of a)."""
    q = random_rotation(6, 0)
    a = torch.tensor([4.0, 1.0, 0.25, 9.0, 0.0, 0.0], dtype=F64)
    b = torch.tensor([1.0, 16.0, 1.0, 0.01, 3.0, 0.0], dtype=F64)
    s1, s2 = q @ torch.diag(a) @ q.T, q @ torch.diag(b) @ q.T
    exact = float((a * b).sqrt().sum())
    # a zero eigenvalue comes out as round-off of 1e-16, whose square root is 1e-8
    assert trace_sqrt_product(s1, s2) == pytest.approx(exact, abs=1e-7)
    assert trace_sqrt_product(torch.diag(a), torch.diag(b)) == pytest.approx(exact, abs=1e-12)


def test_frechet_distance_of_gaussians_in_closed_form():
    """With commuting covariances the Fréchet distance is |m1 - m2|^2 + sum (sqrt a - sqrt b)^2."""
    q = random_rotation(5, 1)
    a = torch.tensor([4.0, 1.0, 0.25, 2.0, 0.5], dtype=F64)
    b = torch.tensor([1.0, 1.0, 1.0, 8.0, 0.5], dtype=F64)
    m1, m2 = torch.zeros(5, dtype=F64), torch.tensor([1.0, -2.0, 0.0, 0.5, 0.0], dtype=F64)
    expected = float(((m1 - m2) ** 2).sum() + ((a.sqrt() - b.sqrt()) ** 2).sum())
    d = gaussian_frechet_distance(m1, q @ torch.diag(a) @ q.T, m2, q @ torch.diag(b) @ q.T)
    assert d == pytest.approx(expected, abs=1e-9)
    assert gaussian_frechet_distance(m1, torch.diag(a), m1, torch.diag(a)) == pytest.approx(0, abs=1e-12)


def test_trace_sqrt_product_agrees_with_scipy_on_non_commuting_matrices():
    g = seeded(2)
    x1, x2 = torch.randn(8, 8, generator=g, dtype=F64), torch.randn(8, 8, generator=g, dtype=F64)
    s1, s2 = x1 @ x1.T + 0.1 * torch.eye(8, dtype=F64), x2 @ x2.T + 0.1 * torch.eye(8, dtype=F64)
    reference = np.trace(scipy.linalg.sqrtm(s1.numpy() @ s2.numpy())).real
    assert trace_sqrt_product(s1, s2) == pytest.approx(reference, rel=1e-9)


def test_frechet_distance_of_features_sees_a_shift_and_nothing_else():
    f = torch.randn(500, 4, generator=seeded(3), dtype=F64)
    assert frechet_distance(f, f) == pytest.approx(0, abs=1e-9)
    shift = torch.tensor([3.0, 0.0, -4.0, 0.0], dtype=F64)
    assert frechet_distance(f, f + shift) == pytest.approx(25.0, rel=1e-9)


# -- precision, recall and class entropy of constructed sets ---------------------------------

def test_precision_and_recall_of_constructed_sets():
    real = torch.randn(400, 3, generator=seeded(4))
    assert precision_recall(real, real) == (1.0, 1.0)
    assert precision_recall(real, real + 100.0) == (0.0, 0.0)  # far away: neither
    # a generator that covers one corner of the data: precise, with little recall
    corner = real[real[:, 0] > 1.0]
    precision, recall = precision_recall(real, corner)
    assert precision == 1.0 and recall < 0.3
    # a generator that spreads far beyond the data: recalls all of it, mostly imprecise
    precision, recall = precision_recall(real, 6 * torch.randn(400, 3, generator=seeded(5)))
    assert precision < 0.3 and recall > 0.9


def test_class_entropy_is_zero_for_one_class_and_log_c_for_all_equally():
    assert class_entropy(torch.zeros(50, dtype=torch.long), 10) == 0.0
    assert class_entropy(torch.arange(100) % 10, 10) == pytest.approx(math.log(10), rel=1e-12)
    assert class_entropy(torch.tensor([0, 0, 1, 1]), 10) == pytest.approx(math.log(2), rel=1e-12)


# -- the judge on digits ---------------------------------------------------------------------

@pytest.fixture(scope="module")
def digits():
    return load_dataset("digits")


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    return tmp_path_factory.mktemp("cache")


@pytest.fixture(scope="module")
def judge(digits, cache):
    """Trained once for the module: 3 s on an idle core, up to 20 s on a busy 2-core machine."""
    return load_judge(digits, cache)


@pytest.fixture(scope="module")
def test_features(judge, digits):
    return judge.features_and_logits(digits.test.x)


def test_the_judge_adapts_to_the_image_size():
    """28x28 images stride down to 7x7, 8x8 digits to 4x4; the head has one "no class" more."""
    for shape in ((1, 28, 28), (1, 8, 8)):
        judge = Classifier(shape, num_classes=10).eval()
        x = torch.rand(3, *shape, generator=seeded(8))
        assert judge.embed(x).shape == (3, 128) and judge(x).shape == (3, 11)


@pytest.mark.slow
def test_the_judge_is_good_and_cached_as_a_state_dict_with_its_accuracy(judge, digits, cache):
    assert judge.accuracy >= 0.95  # measured: 0.996
    weights, meta = cache_paths(cache, "digits")
    assert CLASSIFIER_VERSION in weights.name and weights.is_file()
    info = json.loads(meta.read_text())
    assert info["test_accuracy"] == judge.accuracy and info["dataset"] == "digits"
    Classifier(digits.image_shape, digits.num_classes).load_state_dict(torch.load(weights, weights_only=True))
    reloaded = load_judge(digits, cache)  # from the cache: no training, the same numbers
    assert reloaded.info == judge.info
    torch.testing.assert_close(reloaded.features_and_logits(digits.test.x),
                               judge.features_and_logits(digits.test.x), rtol=0, atol=0)


@pytest.mark.slow
def test_two_halves_of_the_data_are_close_and_noise_is_far(judge, digits, test_features):
    """Measured: 19 between two halves of 134 test images (the bias of covariances estimated
    from few images, smaller again between the test and the 1259 training images), 646 to
    uniform noise."""
    features, _ = test_features
    half = len(features) // 2
    halves = frechet_distance(features[:half], features[half:2 * half])
    noise, _ = judge.features_and_logits(torch.rand(digits.test.x.shape, generator=seeded(6)))
    to_noise = frechet_distance(features, noise)
    train_features, _ = judge.features_and_logits(digits.train.x)
    to_train = frechet_distance(features, train_features)
    assert to_train < halves < 0.1 * to_noise  # more images, smaller bias


@pytest.mark.slow
def test_fd_grows_monotonically_as_noise_is_added(judge, digits, test_features):
    features, _ = test_features
    x = digits.test.x
    distances = []
    for strength in (0.0, 0.05, 0.1, 0.2, 0.4, 0.8):
        noisy = (x + strength * torch.randn(x.shape, generator=seeded(7))).clamp(0, 1)
        distances.append(frechet_distance(features, judge.features_and_logits(noisy)[0]))
    assert distances[0] == pytest.approx(0, abs=1e-6)
    assert all(a < b for a, b in zip(distances, distances[1:])), distances


class Replay(nn.Module):
    """A 'generator' that emits stored images: z is an index into its bank, decode(z) the image
    (the identity link: its likelihood mean is the image itself)."""

    variational = False

    def __init__(self, bank: torch.Tensor, conditional: bool = False, num_classes: int = 10):
        super().__init__()
        self.register_buffer("bank", bank)
        self.likelihood = FixedGaussian(identity=True)
        self.conditional, self.num_classes, self.latent = conditional, num_classes, 1

    def prior_sample(self, n, generator=None, device=None):
        return torch.randint(len(self.bank), (n, 1), generator=generator, device=device)

    def decode(self, z, y=None):  # ignores y
        return self.bank[z[:, 0]]


@pytest.mark.slow
def test_a_generator_of_one_class_covers_no_modes(judge, digits, cache):
    zeros = Replay(digits.test.x[digits.test.y == 0])
    m = evaluate(zeros, digits.test.x, digits.test.y, data=digits, cache_dir=cache,
                 metrics=SAMPLE_METRICS).metrics
    assert m["class_entropy"] == pytest.approx(0, abs=0.05)
    assert m["recall"] < 0.15          # the real zeros are about a tenth of the test set
    assert m["precision"] > 0.9        # what it makes is real
    everything = Replay(digits.test.x)
    m = evaluate(everything, digits.test.x, digits.test.y, data=digits, cache_dir=cache,
                 metrics=SAMPLE_METRICS).metrics
    assert m["class_entropy"] > 0.95 * math.log(10) and m["recall"] > 0.7
    assert "cond_acc" not in m  # not a conditional model


@pytest.mark.slow
def test_a_cvae_that_ignores_its_label_is_at_chance(judge, digits, cache):
    deaf = Replay(digits.test.x, conditional=True)
    m = evaluate(deaf, digits.test.x, digits.test.y, data=digits, cache_dir=cache,
                 metrics=SAMPLE_METRICS).metrics
    n = m["quality_n"]
    assert n == len(digits.test)
    assert abs(m["cond_acc"] - 0.1) < 4 * math.sqrt(0.1 * 0.9 / n)
    assert sorted(k for k in m if k.startswith("cond_acc_")) == sorted(f"cond_acc_{c}" for c in range(10))
    assert m["classifier_acc"] == judge.accuracy


def test_without_the_dataset_or_with_quality_n_zero_there_are_no_sample_metrics(digits, tmp_path):
    model = create_model(RunConfig(model="vae", latent=2), digits.image_shape, 10)
    quality = {"fd", "precision", "recall", "class_entropy", "probe_acc", "quality_seconds"}
    assert not quality & set(evaluate(model, digits.test.x, digits.test.y, k=2).metrics)
    off = evaluate(model, digits.test.x, digits.test.y, k=2, data=digits, cache_dir=tmp_path,
                   quality_n=0).metrics
    assert not quality & set(off) and not list(tmp_path.iterdir())  # no judge trained either


def test_a_damaged_cached_judge_is_trained_again(digits, tmp_path, monkeypatch):
    monkeypatch.setitem(bench.classifier.HYPERPARAMETERS, "max_epochs", 1)  # a quick judge
    monkeypatch.setitem(bench.classifier.HYPERPARAMETERS, "min_epochs", 1)
    weights, meta = cache_paths(tmp_path, "digits")
    weights.write_bytes(b"not a state dict")
    meta.write_text("{}")
    judge = load_judge(digits, tmp_path)
    assert json.loads(meta.read_text()) == judge.info and judge.info["epochs"] == 1
    assert torch.load(weights, weights_only=True).keys() == judge.classifier.state_dict().keys()


@pytest.mark.slow
def test_a_process_embeds_a_test_split_once_and_never_scores_against_another(judge, digits, cache):
    import dataclasses

    from bench import quality
    from bench.data import Split

    model = create_model(RunConfig(model="vae", latent=2), digits.image_shape, 10)
    first = _quality(model, digits, cache, quality_n=10_000)
    again = _quality(model, digits, cache, quality_n=10_000)
    assert [key for key in quality._JUDGES if key[2] == id(digits.test.x)] == [
        ("digits", "none", id(digits.test.x), str(cache), "cpu")]
    clock = "quality_seconds"
    assert {k: v for k, v in again.items() if k != clock} == {k: v for k, v in first.items() if k != clock}
    fewer = dataclasses.replace(digits, test=Split(digits.test.x[:100], digits.test.y[:100]))
    small = _quality(model, fewer, cache, quality_n=10_000)
    assert first["quality_n"] == len(digits.test) and small["quality_n"] == 100  # its own 100 images


def test_the_probe_scores_the_regularised_optimum_as_a_tightly_converged_fit_finds_it(digits):
    """Measured on this model: L-BFGS at its default tolerance stopped short of the optimum and
    scored 0.7658 (two test images more) where the optimum scores 0.7584."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    from bench.quality import encoder_means, probe_metric

    model = fit(RunConfig(model="vae", latent=16, dataset="digits", epochs=3), digits, progress=False).model
    got = probe_metric(model, digits.test.x, digits.test.y, {"data": digits, "device": "cpu", "batch_size": 500})
    means = lambda x: encoder_means(model, x).double().numpy()  # noqa: E731
    tight = make_pipeline(StandardScaler(), LogisticRegression(tol=1e-10, max_iter=100_000))
    tight.fit(means(digits.train.x), digits.train.y.numpy())
    assert got["probe_acc"] == tight.score(means(digits.test.x), digits.test.y.numpy())


def test_quality_n_is_a_run_config_field():
    assert RunConfig().quality_n == 10_000 and RunConfig(quality_n=0).quality_n == 0
    with pytest.raises(ConfigError, match="quality_n"):
        RunConfig(quality_n=-1)
    with pytest.raises(ConfigError, match="quality_n must be 0 .off. or at least 2, got 1"):
        RunConfig(quality_n=1)  # one sample has no covariance: it would end in a LinAlgError
    assert RunConfig(quality_n=2).quality_n == 2


def _quality(model, digits, cache, **kw):
    return evaluate(model, digits.test.x, digits.test.y, k=20, data=digits, cache_dir=cache, **kw).metrics


def _trained_and_untrained(name, digits, cache):
    cfg = RunConfig(model=name, dataset="digits", latent=4, lr=3e-3, epochs=40, dropout=0.0)
    return (_quality(fit(cfg, digits, progress=False).model, digits, cache),
            _quality(create_model(cfg, digits.image_shape, 10), digits, cache))


@pytest.mark.slow
@pytest.mark.parametrize("name", ["vae", "ae"])
def test_a_trained_model_beats_an_untrained_one_on_every_metric(judge, digits, cache, name):
    """Measured (vae / ae): fd 107 / 34 vs 685 / 683; precision 0.68 / 0.81 vs 0; recall
    0.11 / 0.42 vs 0; class entropy 2.19 / 2.28 vs 0 / 0.06 nats; probe 0.84 / 0.85 vs
    0.56 / 0.50. An untrained decoder draws flat grey images: the judge knows them for junk."""
    trained, untrained = _trained_and_untrained(name, digits, cache)
    assert trained["fd"] < 0.3 * untrained["fd"]
    assert trained["precision"] > untrained["precision"] + 0.5
    assert trained["recall"] > 0.05 and untrained["recall"] < 0.01
    assert trained["class_entropy"] > 0.85 * math.log(10) and untrained["class_entropy"] < 0.5
    assert trained["probe_acc"] > untrained["probe_acc"] + 0.15


@pytest.mark.slow
def test_a_trained_cvae_follows_its_labels_and_an_untrained_one_does_not(judge, digits, cache):
    """Measured: cond_acc 1.0 vs 0.1, fd 28 vs 698, marginal NLL 23.7 vs 44.1 nats. Its probe
    is no yardstick: a CVAE is given the label, so a good one keeps it out of z (0.25 here)."""
    trained, untrained = _trained_and_untrained("cvae", digits, cache)
    assert trained["cond_acc"] > 0.9 and untrained["cond_acc"] < 0.3
    assert min(trained[f"cond_acc_{c}"] for c in range(10)) > 0.7
    assert trained["fd"] < 0.3 * untrained["fd"]
    assert trained["precision"] > untrained["precision"] + 0.5
    assert trained["class_entropy"] > 0.95 * math.log(10) and untrained["class_entropy"] < 0.5
    assert trained["nll_marginal"] < untrained["nll_marginal"] - 10
    assert trained["nll"] < trained["nll_marginal"]  # given the label, x is likelier


@pytest.mark.slow
def test_sample_metrics_are_reproducible_and_leave_the_global_rng_alone(judge, digits, cache):
    model = create_model(RunConfig(model="ae", latent=3), digits.image_shape, 10)
    torch.manual_seed(0)
    first = _quality(model, digits, cache, quality_n=100)
    after = torch.rand(3)
    torch.manual_seed(0)
    again = _quality(model, digits, cache, quality_n=100)
    assert torch.equal(torch.rand(3), after)
    assert {k: v for k, v in first.items() if k != "quality_seconds"} == \
        {k: v for k, v in again.items() if k != "quality_seconds"}
    assert first["quality_n"] == 100


@pytest.mark.slow
def test_binarized_studies_are_judged_against_the_grey_images(judge, digits, cache):
    """The judge and its reference are the grey data's: a binarized study of the same dataset
    uses the same cached classifier and the same test features."""
    binary = load_dataset("digits", binarize="static")
    model = Replay(digits.test.x)
    grey = evaluate(model, digits.test.x, digits.test.y, data=digits, cache_dir=cache,
                    metrics=SAMPLE_METRICS).metrics
    static = evaluate(model, binary.test.x, binary.test.y, data=binary, cache_dir=cache,
                      metrics=SAMPLE_METRICS).metrics
    assert grey == pytest.approx({**static, "quality_seconds": grey["quality_seconds"]})
    assert len(list(cache.glob("classifier-digits-*.pt"))) == 1
