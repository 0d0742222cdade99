"""Large IWAE evaluations run the likelihood compiled into one pass (bench.fuse): the same
log p(x) as eager, one compile for every chunk and batch size, eager where compiling fails."""

import os
import subprocess
import sys
import textwrap

import pytest
import torch

from bench import fuse
from bench.config import RunConfig
from bench.data import load_dataset
from bench.evaluate import evaluate, iwae_log_likelihood
from bench.models import create_model

pytestmark = pytest.mark.usefixtures("one_thread")


def _model(loss: str):
    data = load_dataset("digits", "static")
    torch.manual_seed(0)
    cfg = RunConfig(model="vae", loss=loss, latent=4, dataset="digits", binarize="static", dropout=0.0)
    return create_model(cfg, data.image_shape, data.num_classes).eval(), data.test.x[:30]


@pytest.mark.parametrize("loss", ["seed-bce", "gaussian"])  # gaussian: a likelihood with a parameter
def test_the_compiled_likelihood_gives_the_eager_log_likelihood(loss):
    model, x = _model(loss)
    fused = fuse.Fused(model.likelihood)
    for images, k in ((30, 200), (7, 50)):  # two batch sizes and chunk shapes, the last chunk short
        eager = iwae_log_likelihood(model, x[:images], k=k, generator=torch.Generator().manual_seed(0),
                                    max_elements=2**14)
        compiled = iwae_log_likelihood(model, x[:images], k=k, generator=torch.Generator().manual_seed(0),
                                       max_elements=2**14, likelihood=fused)
        torch.testing.assert_close(compiled, eager, rtol=1e-6, atol=1e-4)
    assert fused.compiled is not None  # it ran compiled throughout, no fallback


def test_evaluate_fuses_only_evaluations_large_enough_to_pay_for_the_compile(monkeypatch):
    model, x = _model("seed-bce")
    values = 30 * 100 * x[0].numel()
    assert isinstance(fuse.likelihood_for(model, fuse.FUSE_ABOVE, "cpu"), fuse.Fused)
    assert not isinstance(fuse.likelihood_for(model, fuse.FUSE_ABOVE - 1, "cpu"), fuse.Fused)
    assert not isinstance(fuse.likelihood_for(model, fuse.FUSE_ABOVE, "cuda"), fuse.Fused)  # not measured there
    bce, _ = _model("bce")  # one ATen kernel already: compiling measured no faster
    assert not isinstance(fuse.likelihood_for(bce, fuse.FUSE_ABOVE, "cpu"), fuse.Fused)
    eager = evaluate(model, x, None, k=100, metrics=["nll"]).metrics["nll"]
    monkeypatch.setattr(fuse, "FUSE_ABOVE", values)  # this evaluation is now "large"
    assert evaluate(model, x, None, k=100, metrics=["nll"]).metrics["nll"] == pytest.approx(eager, rel=1e-6)


def test_without_a_cpp_compiler_it_warns_once_and_evaluates_eagerly(tmp_path):
    script = textwrap.dedent("""
        import warnings, torch
        from bench import fuse
        from bench.config import RunConfig
        from bench.evaluate import iwae_log_likelihood
        from bench.models import create_model
        torch.manual_seed(0)
        model = create_model(RunConfig(model="vae", loss="seed-bce", latent=4), (1, 8, 8), 10).eval()
        x = torch.rand(6, 1, 8, 8).round()
        fused = fuse.Fused(model.likelihood)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            got = [iwae_log_likelihood(model, x, k=40, generator=torch.Generator().manual_seed(0), likelihood=fused)
                   for _ in range(2)]
        eager = iwae_log_likelihood(model, x, k=40, generator=torch.Generator().manual_seed(0))
        assert all(torch.equal(g, eager) for g in got), "the fallback is the eager likelihood"
        failed = [str(w.message) for w in caught if "torch.compile of the likelihood failed" in str(w.message)]
        assert len(failed) == 1 and fused.compiled is None, failed
        print("fell back:", failed[0])
    """)
    env = {**os.environ, "CXX": str(tmp_path / "no-such-c++"), "TORCHINDUCTOR_CACHE_DIR": str(tmp_path / "cache")}
    done = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "fell back: torch.compile of the likelihood failed" in done.stdout
