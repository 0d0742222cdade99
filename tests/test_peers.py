"""pythae 0.1.2 as an independent check of our estimator and as `bench perf`'s peer: on the
same weights and images its get_nll and our iwae_log_likelihood estimate the same log p(x)."""

import pytest
import torch

from bench import peers
from bench.config import RunConfig
from bench.data import load_dataset
from bench.evaluate import iwae_log_likelihood
from bench.models import create_model
from bench.train import fit

pytestmark = [pytest.mark.usefixtures("one_thread"),
              pytest.mark.skipif(not peers.available(), reason="pythae not installed (pip install -e .[peers])")]


@pytest.fixture(scope="module")
def trained():
    data = load_dataset("digits", "static")  # binary pixels: pythae's bce is then a density too
    cfg = RunConfig(model="vae", loss="bce", latent=4, dataset="digits", binarize="static", epochs=3, dropout=0.0)
    return fit(cfg, data, progress=False).model, data


def test_pythae_and_our_estimator_agree_on_the_same_weights(trained):
    model, data = trained
    x = data.test.x[:12]
    ours = iwae_log_likelihood(model, x, k=500, generator=torch.Generator().manual_seed(0))
    torch.manual_seed(1)  # pythae draws from the global generator
    theirs, seconds = peers.log_likelihood(model, x, k=500)
    assert theirs.shape == ours.shape and seconds > 0
    result = peers.agreement(ours, theirs)
    assert abs(result["gap_nats"]) < 4 * result["gap_se"] + 0.05
    assert result["ours"] == pytest.approx(float(ours.mean()))
    assert result["pythae"] == pytest.approx(float(theirs.mean()))
    # a different model is told apart: the check is not blind
    other = create_model(RunConfig(model="vae", loss="bce", latent=4), data.image_shape, data.num_classes).eval()
    torch.manual_seed(1)
    far = peers.agreement(ours, peers.log_likelihood(other, x, k=50)[0])
    assert abs(far["gap_nats"]) > 10 * far["gap_se"]


def test_pythae_trains_the_same_net_in_its_own_loop(trained):
    _, data = trained
    model = create_model(RunConfig(model="vae", loss="bce", latent=4), data.image_shape, data.num_classes)
    before = [p.detach().clone() for p in model.encoder.parameters()]
    assert peers.train_rate(model, data.train.x[:256], lr=1e-3, batch_size=64) > 0
    assert any(not torch.equal(a, b) for a, b in zip(before, model.encoder.parameters()))  # our weights moved
