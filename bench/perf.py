"""`bench perf`: how fast one trial trains, against baselines measured in the same run.

Every figure is a median over interleaved rounds (this kind of machine drifts by tens of
percent between runs, so only ratios measured together mean anything). The net is the seed's
(D-128-64 ReLU, latent 32, decoder back), batch 64, one torch thread, as sweep workers run:

- `trainer_samples_per_s`: `bench.train.fit`, training steps only;
- `naive_samples_per_s`: the tutorial loop, `DataLoader(TensorDataset)` + `torch.optim.Adam`;
- `gemm_samples_per_s`: the step's matrix products alone (forward and backward), preallocated;
- `gemm_ew_samples_per_s`: those plus one pass per elementwise op the step cannot avoid
  (activations and their gradients, the reparameterisation, the loss, one Adam pass);
- `gemm_ew_fraction`: trainer / the gemm+ew bound;
- `iwae_images_per_s`: `iwae_log_likelihood` at k = 5000 on the same net;
- `tracking_overhead`: a tracked trial (MLflow) / the same trial untracked, minus 1;
- `peak_rss_mb` of this process.
Figures this does not measure yet are null with a note (stacked trials, pythae).
"""

from __future__ import annotations

import dataclasses
import json
import math
import platform
import resource
import statistics
import tempfile
import time
from pathlib import Path

import torch

BATCH, LATENT = 64, 32


def machine() -> dict:
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
    return {"cpu": cpu, "gpu": gpu, "threads": torch.get_num_threads(), "torch": torch.__version__,
            "python": platform.python_version()}


def _data(quick: bool):
    from bench.data import Split, auto_dataset, load_dataset

    name = "fashion-mnist" if auto_dataset() == "fashion-mnist" else "mnist5k"
    data = load_dataset(name)
    n = 3_200 if quick else 12_800
    return dataclasses.replace(data, train=Split(data.train.x[:n], data.train.y[:n]),
                               val=Split(data.val.x[:500], data.val.y[:500]))


def _config(data):
    from bench.config import RunConfig

    return RunConfig(model="vae", arch="seed", loss="seed-bce", latent=LATENT, dataset=data.name,
                     batch_size=BATCH, epochs=1, dropout=0.1, device="cpu", seed=0)


def trainer_rate(data) -> float:
    from bench.train import fit

    return fit(_config(data), data, progress=False).history[0]["samples_per_s"]


def naive_rate(data) -> float:
    """The tutorial's loop: a DataLoader over a TensorDataset, plain Adam, loss per batch."""
    from bench.models import create_model

    model = create_model(_config(data), data.image_shape, data.num_classes)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(data.train.x, data.train.y),
                                         batch_size=BATCH, shuffle=True)
    started = time.perf_counter()
    for x, _ in loader:
        loss = model.terms(x)["loss"].mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return len(data.train.x) / (time.perf_counter() - started)


def _shapes(d: int) -> list[tuple[int, int]]:
    """(in, out) of every linear layer of the seed net on D pixels."""
    return [(d, 128), (128, 64), (64, LATENT), (64, LATENT), (LATENT, 64), (64, 128), (128, d)]


def gemm_rate(d: int, elementwise: bool, steps: int) -> float:
    """Samples/s of the step's matrix products (forward, grad input, grad weight), with one
    pass per unavoidable elementwise op when `elementwise`."""
    layers = [(torch.randn(BATCH, a), torch.randn(a, b) / a, torch.empty(BATCH, b), torch.empty(a, b),
               torch.empty(BATCH, a), torch.zeros(b)) for a, b in _shapes(d)]
    params = [torch.randn(a, b) for a, b in _shapes(d)]
    started = time.perf_counter()
    for _ in range(steps):
        for i, (x, w, out, gw, gx, bias) in enumerate(layers):
            torch.addmm(bias, x, w, out=out)            # forward with the bias folded in
            torch.mm(x.t(), out, out=gw)                # grad weight
            if i:
                torch.mm(out, w.t(), out=gx)            # grad input (not for the data)
            if elementwise:
                out.relu_()                             # activation, and its gradient mask
                out.mul_(0.5)
        if elementwise:
            logits = layers[-1][2]
            torch.sigmoid(logits).sub_(logits)          # the loss and its gradient from logits
            for p in params:                            # one fused Adam pass (m, v, update)
                p.mul_(0.999).add_(p, alpha=1e-3)
    return steps * BATCH / (time.perf_counter() - started)


def iwae_rate(data, k: int, images: int) -> float:
    from bench.evaluate import iwae_log_likelihood
    from bench.models import create_model

    model = create_model(_config(data), data.image_shape, data.num_classes).eval()
    x = data.test.x[:images]
    started = time.perf_counter()
    iwae_log_likelihood(model, x, k=k, generator=torch.Generator().manual_seed(0))
    return images / (time.perf_counter() - started)


def tracking_overhead(data) -> float:
    """A tracked trial's wall time over the same trial untracked, minus 1."""
    from bench import tracking
    from bench.evaluate import evaluate
    from bench.train import fit
    from bench.trial import run_tracked

    cfg = dataclasses.replace(_config(data), eval_k=10, eval_n=50)
    with tempfile.TemporaryDirectory() as tmp:
        client = tracking.connect(tracking.default_uri(tmp))  # the store's migrations: not timed
        exp_id = tracking.experiment_id(client, "perf")
        started = time.perf_counter()
        result = fit(cfg, data, progress=False)
        evaluate(result.model, data.test.x, data.test.y, k=10, nll_n=50)
        plain = time.perf_counter() - started
        started = time.perf_counter()
        run_tracked(cfg, data, client=client, exp_id=exp_id, run_name="perf", results=tmp, progress=False)
        tracked = time.perf_counter() - started
    return tracked / plain - 1


def run(quick: bool = False, rounds: int | None = None) -> dict:
    """Every figure, interleaved over `rounds`, medians."""
    torch.set_num_threads(1)
    data = _data(quick)
    rounds = rounds or (2 if quick else 3)
    d = math.prod(data.image_shape)
    steps = 200 if quick else 1000
    samples: dict[str, list[float]] = {}
    for _ in range(rounds):
        for name, measure in (("trainer_samples_per_s", lambda: trainer_rate(data)),
                              ("naive_samples_per_s", lambda: naive_rate(data)),
                              ("gemm_samples_per_s", lambda: gemm_rate(d, False, steps)),
                              ("gemm_ew_samples_per_s", lambda: gemm_rate(d, True, steps)),
                              ("iwae_images_per_s", lambda: iwae_rate(data, 5000, 5 if quick else 20))):
            samples.setdefault(name, []).append(measure())
    out = {name: statistics.median(values) for name, values in samples.items()}
    out["gemm_ew_fraction"] = out["trainer_samples_per_s"] / out["gemm_ew_samples_per_s"]
    out["speedup_vs_naive"] = out["trainer_samples_per_s"] / out["naive_samples_per_s"]
    out["tracking_overhead"] = None if quick else tracking_overhead(data)
    out.update({"pythae_samples_per_s": None, "speedup_vs_pythae": None, "speedup_vs_pythae_nll": None,
                "stacked": None, "stacked_roofline_fraction": None, "default_sweep_speedup": None,
                "sweep_overhead": None,
                "notes": ["pythae: not installed here (optional extra `peers`, not declared yet)",
                          "stacked trials are not implemented yet (issue: train at the hardware's speed)",
                          "the gemm+ew bound counts one pass per elementwise op; an approximation"]})
    out["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    out.update({"machine": machine(), "dataset": data.name, "train_images": len(data.train.x),
                "rounds": rounds, "quick": quick, "when": time.strftime("%Y-%m-%d %H:%M:%S")})
    return out


def markdown(result: dict) -> str:
    m = result["machine"]
    lines = [f"machine: {m['cpu']}{' + ' + m['gpu'] if m['gpu'] else ''}, {m['threads']} torch thread(s), "
             f"torch {m['torch']}; {result['dataset']}, {result['train_images']} training images, "
             f"median of {result['rounds']} interleaved rounds ({result['when']})", "",
             "| figure | value |", "|---|---|"]
    for key, value in result.items():
        if key in ("machine", "notes", "dataset", "train_images", "rounds", "quick", "when"):
            continue
        shown = "—" if value is None else (f"{value:,.0f}" if abs(value) >= 100 else f"{value:.3f}")
        lines.append(f"| `{key}` | {shown} |")
    lines += [""] + [f"- {note}" for note in result["notes"]]
    return "\n".join(lines)


def main(quick: bool = False, out: str | None = None) -> str:
    result = run(quick=quick)
    if out:
        Path(out).parent.mkdir(parents=True, exist_ok=True)
        Path(out).write_text(json.dumps(result, indent=2) + "\n")
    return markdown(result)
