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
- `iwae_images_per_s`: `iwae_log_likelihood` at k = 5000 on the same net, eager, and
  `iwae_fused_images_per_s` with its likelihood compiled (`bench.fuse`: what evaluations of
  FUSE_ABOVE values or more use), after a compile of `iwae_compile_s` seconds;
- `tracking_overhead`: a tracked trial (MLflow) / the same trial untracked, minus 1, in wall
  time, and `tracking_cpu_overhead` in the process's CPU time (what a sweep on every core pays);
- `stacked`: summed samples/s of N = 1, 4, 16, 64 seed trials trained as one stack on every
  core, `stacked_speedup` (best / N = 1) and `stacked_roofline_fraction` (best / the step's
  matmuls alone at that batch on as many threads);
- `sweep_overhead` (the smoke study's wall time / its trials' training time, minus 1) and
  `default_sweep_speedup` (the default study one trial at a time / stacked, 2 workers): whole
  studies, so only without --quick; `sweep_breakdown_s` and `default_sweep_s` say where each
  study's seconds went (see `study_seconds`);
- `peak_rss_mb` of this process.
- `pythae_samples_per_s`, `speedup_vs_pythae`, `speedup_vs_pythae_nll` (eager and `_fused`) and
  `nll_vs_pythae`: pythae
  0.1.2 (optional extra `peers`) on the same net and weights, interleaved with ours.
Figures this does not measure are null with a note (pythae when it is not installed).
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import platform
import resource
import statistics
import tempfile
import time
from pathlib import Path

import torch

BATCH, LATENT = 64, 32
EXPERIMENTS = Path(__file__).resolve().parent.parent / "experiments"


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


def gemm_rate(d: int, elementwise: bool, steps: int, batch: int = BATCH) -> float:
    """Samples/s of the step's matrix products (forward, grad input, grad weight), with one
    pass per unavoidable elementwise op when `elementwise`."""
    layers = [(torch.randn(batch, a), torch.randn(a, b) / a, torch.empty(batch, b), torch.empty(a, b),
               torch.empty(batch, a), torch.zeros(b)) for a, b in _shapes(d)]
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
    return steps * batch / (time.perf_counter() - started)


STACKS = (1, 4, 16, 64)


def stacked_rate(data, n: int) -> float:
    """Summed training samples/s of n seed trials (seeds 0..n-1) trained as one stack."""
    from bench.stack import fit_stack

    cfgs = [dataclasses.replace(_config(data), seed=seed) for seed in range(n)]
    return n * fit_stack(cfgs, data)[0].history[0]["samples_per_s"]


def _threads(count: int, measure):
    before = torch.get_num_threads()
    torch.set_num_threads(count)
    try:
        return measure()
    finally:
        torch.set_num_threads(before)


def study_seconds(spec_path: str, stack: int, workers: int) -> dict[str, float]:
    """Where a whole study's wall time goes, in a fresh results folder: `wall`, the trials'
    own training (`training`, as their runs record it), the trials' runs from start to end
    (`trials`: training plus evaluation, pictures and tracking; summed over workers), the
    sample-quality metrics within them (`quality`, the judge's one-off training included)."""
    from bench import sweep, tracking
    from bench.spec import load_spec

    with tempfile.TemporaryDirectory() as tmp:
        started = time.perf_counter()
        out = sweep.run_study(load_spec(spec_path), results=tmp, workers=workers, progress=False, stack=stack)
        wall = time.perf_counter() - started
        client = tracking.connect(out.tracking_uri)
        runs = tracking.trial_runs(client, out.experiment_id, out.study)
    return {"wall": wall, "training": sum(r.data.metrics.get("trial_seconds", 0.0) for r in runs),
            "trials": sum((r.info.end_time - r.info.start_time) / 1000 for r in runs if r.info.end_time),
            "quality": sum(r.data.metrics.get("test/quality_seconds", 0.0) for r in runs)}


def _iwae(data, k: int, images: int, fused: bool = False):
    """(model, images, our log p(x) per image, images/s, compile seconds) of `iwae_log_likelihood`
    at k, eager or with the compiled likelihood (`bench.fuse`, compiled first on 2 images)."""
    from bench.evaluate import iwae_log_likelihood
    from bench.fuse import Fused, repeated
    from bench.models import create_model

    torch.manual_seed(0)
    model = create_model(_config(data), data.image_shape, data.num_classes).eval()
    x, likelihood, compile_s = data.test.x[:images], repeated(model.likelihood), 0.0
    if fused:
        likelihood, started = Fused(model.likelihood), time.perf_counter()
        iwae_log_likelihood(model, x[:2], k=64, likelihood=likelihood)
        compile_s = time.perf_counter() - started
    started = time.perf_counter()
    log_px = iwae_log_likelihood(model, x, k=k, generator=torch.Generator().manual_seed(0), likelihood=likelihood)
    return model, x, log_px, images / (time.perf_counter() - started), compile_s


def iwae_rate(data, k: int, images: int, fused: bool = False) -> float:
    return _iwae(data, k, images, fused)[3]


def pythae_rate(data) -> float:
    from bench import peers
    from bench.models import create_model

    torch.manual_seed(0)
    model = create_model(_config(data), data.image_shape, data.num_classes)
    return peers.train_rate(model, data.train.x, lr=1e-3, batch_size=BATCH)


def nll_against_pythae(data, k: int, images: int) -> dict:
    """Ours and pythae's get_nll on the same weights and images: images/s of each, and the
    paired gap in nats with its standard error."""
    from bench import peers

    model, x, ours, ours_rate, _ = _iwae(data, k, images)
    _, _, fused, fused_rate, compile_s = _iwae(data, k, images, fused=True)
    theirs, seconds = peers.log_likelihood(model, x, k)
    return {"ours_images_per_s": ours_rate, "ours_fused_images_per_s": fused_rate, "compile_s": compile_s,
            "fused_max_gap": float((fused - ours).abs().max()), "pythae_images_per_s": images / seconds,
            **peers.agreement(ours, theirs)}


def tracking_overhead(data, rounds: int = 3, epochs: int = 5) -> tuple[float, float]:
    """A tracked trial's wall time over the same trial untracked, minus 1, and the same for
    the process's CPU time (every thread of it: work a free core would hide from the wall
    clock is still paid by a sweep that keeps every core busy): medians over interleaved
    pairs after one warm-up pair (the first trial of a process pays imports)."""
    from bench import tracking
    from bench.evaluate import evaluate
    from bench.train import fit
    from bench.trial import run_tracked

    # the same evaluation both ways (no sample-quality judge: its one-off training is not tracking)
    cfg = dataclasses.replace(_config(data), eval_k=10, eval_n=50, quality_n=0, epochs=epochs)
    wall, cpu = [], []
    with tempfile.TemporaryDirectory() as tmp:
        client = tracking.connect(tracking.default_uri(tmp))  # the store's migrations: not timed
        exp_id = tracking.experiment_id(client, "perf")
        for i in range(rounds + 1):
            started, cpu_started = time.perf_counter(), time.process_time()
            result = fit(cfg, data, progress=False)
            evaluate(result.model, data.test.x, data.test.y, k=10, nll_n=50, binary_data=data.binary, quality_n=0)
            plain, plain_cpu = time.perf_counter() - started, time.process_time() - cpu_started
            started, cpu_started = time.perf_counter(), time.process_time()
            run_tracked(cfg, data, client=client, exp_id=exp_id, run_name=f"perf {i}", results=tmp, progress=False)
            if i:
                wall.append((time.perf_counter() - started) / plain)
                cpu.append((time.process_time() - cpu_started) / plain_cpu)
    return statistics.median(wall) - 1, statistics.median(cpu) - 1


def run(quick: bool = False, rounds: int | None = None) -> dict:
    """Every figure, interleaved over `rounds`, medians."""
    from threadpoolctl import threadpool_limits

    torch.set_num_threads(1)
    threadpool_limits(1)  # numpy's BLAS as a sweep worker has it (bench.worker)
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
                              ("iwae_images_per_s", lambda: iwae_rate(data, 5000, 5 if quick else 20)),
                              ("iwae_fused_images_per_s", lambda: iwae_rate(data, 5000, 5 if quick else 20, True))):
            samples.setdefault(name, []).append(measure())
    from bench import peers
    with_peers = peers.available()
    if with_peers:  # the peer interleaved with ours, round by round
        for _ in range(rounds):
            samples.setdefault("pythae_samples_per_s", []).append(pythae_rate(data))
        nll = [nll_against_pythae(data, 5000, 5 if quick else 20) for _ in range(rounds)]
    cores = os.cpu_count() or 1
    for _ in range(rounds):  # stacks on every core, as one worker with --stack trains them
        for size in STACKS:
            samples.setdefault(f"stacked_{size}", []).append(_threads(cores, lambda: stacked_rate(data, size)))
    out = {name: statistics.median(values) for name, values in samples.items() if not name.startswith("stacked_")}
    stacked = {size: statistics.median(samples[f"stacked_{size}"]) for size in STACKS}
    best = max(stacked, key=stacked.get)
    roofline = _threads(cores, lambda: gemm_rate(d, False, steps // 4, batch=BATCH * best))
    out["stacked"] = {str(size): rate for size, rate in stacked.items()}
    out["stacked_speedup"] = stacked[best] / stacked[1]
    out["stacked_roofline_fraction"] = stacked[best] / roofline
    out["gemm_ew_fraction"] = out["trainer_samples_per_s"] / out["gemm_ew_samples_per_s"]
    out["speedup_vs_naive"] = out["trainer_samples_per_s"] / out["naive_samples_per_s"]
    out["tracking_overhead"], out["tracking_cpu_overhead"] = (None, None) if quick else tracking_overhead(data)
    out.update({"pythae_samples_per_s": None, "speedup_vs_pythae": None, "speedup_vs_pythae_nll": None,
                "speedup_vs_pythae_nll_fused": None, "iwae_compile_s": None,
                "nll_vs_pythae": None, "default_sweep_speedup": None, "sweep_overhead": None,
                "sweep_breakdown_s": None, "default_sweep_s": None,
                "notes": [f"stacked: summed samples/s of N seed trials as one stack on {cores} thread(s); "
                          f"roofline: the step's matmuls alone at batch {BATCH} x {best} on as many threads",
                          "the gemm+ew bound counts one pass per elementwise op; an approximation"]})
    if with_peers:
        out["pythae_samples_per_s"] = statistics.median(samples["pythae_samples_per_s"])
        out["speedup_vs_pythae"] = out["trainer_samples_per_s"] / out["pythae_samples_per_s"]
        out["speedup_vs_pythae_nll"] = statistics.median(r["ours_images_per_s"] / r["pythae_images_per_s"] for r in nll)
        out["speedup_vs_pythae_nll_fused"] = statistics.median(r["ours_fused_images_per_s"] / r["pythae_images_per_s"]
                                                               for r in nll)
        out["iwae_compile_s"] = statistics.median(r["compile_s"] for r in nll)
        out["nll_vs_pythae"] = nll[-1]
        out["notes"].append("pythae 0.1.2: its BaseTrainer.train_step and get_nll (k = 5000) on the same net and "
                            "weights; nll_vs_pythae: mean log p(x) of both on the same images, paired gap and its se")
    else:
        out["notes"].append("pythae: not installed (pip install -e .[peers]); its figures are null")
    if not quick:  # whole studies: minutes each
        smoke = study_seconds(str(EXPERIMENTS / "smoke.toml"), stack=1, workers=1)
        out["sweep_overhead"] = smoke["wall"] / smoke["training"] - 1
        out["sweep_breakdown_s"] = smoke
        solo = study_seconds(str(EXPERIMENTS / "default.toml"), stack=1, workers=2)
        stacked = study_seconds(str(EXPERIMENTS / "default.toml"), stack=None, workers=2)
        out["default_sweep_speedup"] = solo["wall"] / stacked["wall"]
        out["default_sweep_s"] = solo
        out["notes"].append(f"default study: {solo['wall']:.0f} s one trial at a time, {stacked['wall']:.0f} s "
                            "stacked (2 workers); sweep_overhead: the smoke study's wall time over its trials' "
                            "training; *_s: wall, training, trial runs end to end, sample quality (seconds)")
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
        if isinstance(value, dict):
            value = ", ".join(f"N={k}: {v:,.0f}" if key == "stacked" else f"{k} {v:,.2f}" for k, v in value.items())
            lines.append(f"| `{key}` | {value} |")
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
