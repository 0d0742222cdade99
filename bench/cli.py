"""`bench list|train|sweep|worker|report|table|ui|dashboard`: parses arguments, calls the
functions that do the work, and prints a BenchError as one line with a non-zero exit."""

from __future__ import annotations

import argparse
import os
import select
import shutil
import sys
from pathlib import Path

from bench.errors import BenchError

RESULTS_ENV = "VAEBENCH_RESULTS"


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):  # one line, not usage + traceback-like noise
        sys.stderr.write(f"bench: error: {message} (see `{self.prog} --help`)\n")
        raise SystemExit(2)


def _results(args) -> Path:
    return Path(args.results or os.environ.get(RESULTS_ENV) or "results")


def _add_results(p):
    p.add_argument("--results", help=f"where every output goes (default ${RESULTS_ENV} or results/)")


def cmd_list(args):
    import bench

    kinds = [args.kind] if args.kind else list(bench.ALL)
    for kind in kinds:
        registry = bench.ALL[kind]
        names = registry.names(_glob(args.pattern))
        width = max(map(len, names), default=0)
        print(f"{kind} ({len(names)}):")
        for name in names:
            print(f"  {name:<{max(width, 14)}} {registry.entry(name).summary}")
    return 0


def _glob(pattern: str | None) -> str:
    """An fnmatch pattern as given; a plain word matches any name that contains it ("gauss")."""
    if not pattern:
        return "*"
    return pattern if any(ch in pattern for ch in "*?[") else f"*{pattern}*"


def _run_config(args):
    from bench.config import RunConfig, field_names
    from bench.registry import PRESETS

    values = dict(PRESETS.get(args.preset)()) if args.preset else {}
    values.update({f: getattr(args, f) for f in field_names() if getattr(args, f, None) is not None})
    return RunConfig.from_dict(values)


def cmd_train(args):
    import bench  # noqa: F401  (registries)
    from bench.data import load_dataset

    cfg = _run_config(args)  # bad values fail here, before the heavier imports below
    from bench.locations import name_problem

    if problem := name_problem(args.experiment):
        raise BenchError(f"--experiment {args.experiment[:60]!r}: {problem}")
    data = load_dataset(cfg.dataset, cfg.binarize)
    from bench import tracking
    from bench.trial import check_config, run_tracked

    check_config(cfg, data)
    results = _results(args)
    uri = args.tracking_uri or tracking.default_uri(results)
    client = tracking.connect(uri)
    exp_id = tracking.experiment_id(client, args.experiment)
    name = f"{cfg.model}-{cfg.arch}-{cfg.loss}-z{cfg.latent}-{cfg.dataset}-s{cfg.seed}"
    out = run_tracked(cfg, data, client=client, exp_id=exp_id, run_name=name, results=results,
                      tags={"vaebench.preset": args.preset or ""})
    last = out.result.history[-1]
    print(f"{name}: {len(out.result.history)} epochs on {data.name} ({data.binarize}), best epoch "
          f"{out.result.best_epoch} by {out.result.selection}, device {out.result.device}")
    rows = [(k, v) for k, v in out.metrics.items() if k not in ("test/nll_k", "test/nll_n")]
    rows += [("seconds", out.result.seconds), ("samples/s (last epoch)", last["samples_per_s"])]
    width = max(len(k) for k, _ in rows)
    for key, value in rows:
        note = f"  (k={cfg.eval_k}, {int(out.metrics['test/nll_n'])} images)" if key == "test/nll" else ""
        print(f"  {key:<{width}}  {value:>12.3f}{note}")
    if not out.evaluation.proper_density:
        print(f"  note: loss {cfg.loss!r} is not a normalised density on this data "
              f"({'binary' if data.binary else 'continuous'}): its nats do not compare with other losses")
    print(f"checkpoint: {out.result.checkpoints.get('best')}\nmlflow run: {out.run_id} ({uri})")
    return 0


def _spec(args):
    from bench.spec import override
    from bench.sweep import load_any_spec

    spec = load_any_spec(args.spec)
    changes = {k: v for k, v in (("epochs", getattr(args, "epochs", None)),
                                 ("seeds", getattr(args, "seeds", None))) if v is not None}
    return override(spec, **changes) if changes else spec


def _positive(text: str, most: int | None = None) -> int:
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1 or (most is not None and value > most):
        raise argparse.ArgumentTypeError(f"must be a whole number >= 1{f' and <= {most}' if most else ''}, "
                                         f"got {text!r}")
    return value


def _port(text: str) -> int:  # uvicorn's traceback for port 99999 ended in exit 0
    return _positive(text, 65535)


def cmd_sweep(args):
    from bench import sweep
    from bench.registry import DATASETS
    from bench.spec import format_plan

    if args.workers < 0:
        raise BenchError(f"--workers must be >= 0 (0 only queues the cells), got {args.workers}")
    spec = sweep.resolve(_spec(args))
    if args.dry_run:
        # --workers 0 only queues: the estimate is then for one `bench worker`
        print(format_plan(spec, train_size=DATASETS.meta(spec.dataset).get("train_size"),
                          workers=max(1, args.workers)))
        if args.workers == 0:
            print("--workers 0: this only queues the cells; `bench worker SPEC` processes train them")
        return 0
    results = _results(args)
    try:
        out = sweep.run_study(spec, results=results, workers=args.workers, storage=args.storage,
                              tracking_uri_=args.tracking_uri, restart=args.restart, stack=args.stack)
    except KeyboardInterrupt:
        print(f"\ninterrupted: finished cells are kept; run the same command again to resume "
              f"({args.spec})", file=sys.stderr)
        return 130
    print(f"\n{out.study} on {out.dataset}: {out.done}/{out.trials} trials done "
          f"({out.trained_now} trained now, {out.seconds / 60:.1f} min)")
    print(out.summary)
    if args.workers == 0 and out.done < out.trials:
        print(_queued(out, f"bench worker {args.spec}", f"bench report {out.study}"))
    for cell, reason in out.failed:
        print(f"FAILED {cell}: {reason}", file=sys.stderr)
    if out.done:
        try:
            from bench.report import write_report
        except ImportError:
            write_report = None
        if write_report is not None:
            try:
                path = write_report(spec.name, results=results, tracking_uri=out.tracking_uri, storage=out.storage)
                print(f"report: {path / 'report.html'}")
            except Exception as e:  # noqa: BLE001 - the store went away: say so, keep the exit status
                print(f"report not written: {str(e).splitlines()[0][:300]}", file=sys.stderr)
    print(_browse(out.tracking_uri, out.experiment_id))
    return 1 if out.failed else 0


def _browse(uri: str, experiment_id: str) -> str:
    """Where to see the runs: a server's own URL, else the command that serves this store
    (`make ui` serves results/ of the checkout it runs in) and the URL it will have."""
    from bench import tracking

    url = tracking.experiment_url(tracking.ui_base(uri), experiment_id)
    if uri.startswith("http"):
        return f"browse the runs: {url}"
    make = Path("Makefile").is_file() and uri == tracking.default_uri("results")
    return f"browse the runs: {'make ui' if make else f'bench ui --tracking-uri {uri}'}, then open {url}"


def cmd_worker(args):
    from bench import sweep

    spec = _spec(args)
    ran = sweep.run_worker(spec, results=_results(args), storage=args.storage, tracking_uri_=args.tracking_uri,
                           worker=args.worker_id, threads=args.threads, stack=args.stack)
    print(f"[worker {args.worker_id}] queue empty after {ran} trial(s)", flush=True)
    return 0


def cmd_report(args):
    from bench.report import write_report

    path = write_report(args.experiment, results=_results(args), tracking_uri=args.tracking_uri,
                        storage=args.storage)
    print(f"report: {path / 'report.html'}\n        {path / 'report.md'}")
    return 0


def cmd_table(args):
    from bench import sweep
    from bench.tables import PAPERS, paper_named, paper_spec, write_table

    if args.workers < 0:
        raise BenchError(f"--workers must be >= 0 (0 only queues the cells), got {args.workers}")
    names = list(PAPERS) if args.name == "all" else [args.name]
    for name in names:
        if name not in PAPERS:
            raise BenchError(f"unknown paper table {name!r}: choose from {', '.join(PAPERS)} or all")
        outcome = sweep.run_study(paper_spec(name, args.full), results=_results(args), workers=args.workers)
        if args.workers == 0 and outcome.done < outcome.trials:
            spec_path = Path(paper_named(name).spec_path(args.full)).resolve()
            again = f"bench table {name}{' --full' if args.full else ''}"
            print(_queued(outcome, f"bench worker {_shown(spec_path)}", again))
            continue
        print(write_table(name, results=_results(args), full=args.full, tracking_uri=outcome.tracking_uri))
        if args.publish:
            from bench.publish import publish

            publish(name, args.publish, results=_results(args), full=args.full, tracking_uri=outcome.tracking_uri)
            print(f"published: {args.publish}/ (table.md, table.tex, results.json, validation_curves.png)")
    return 0


def _shown(path: Path) -> str:
    """`path` relative to the working directory where it lies below it, else absolute."""
    return str(path.relative_to(Path.cwd())) if path.is_relative_to(Path.cwd()) else str(path)


def _queued(out, worker: str, then: str) -> str:
    return (f"--workers 0 queued {out.trials - out.done} of {out.trials} trials of {out.study!r}: `{worker}` "
            f"processes (same --results, or the same --storage and --tracking-uri) train them; then run `{then}`")


def cmd_ui(args):
    from bench import locations, tracking

    uri = args.tracking_uri or locations.default_tracking(_results(args))
    if locations.sqlite_path(uri) is not None and not locations.sqlite_path(uri).exists():
        raise BenchError(f"no MLflow store at {uri}: run `make sweep` (or `bench train ...`) first")
    client = tracking.connect(uri)
    experiments = sorted((e for e in client.search_experiments() if e.name != "Default"),
                         key=lambda e: e.creation_time or 0, reverse=True)
    mlflow = shutil.which("mlflow", path=str(Path(sys.executable).parent)) or shutil.which("mlflow")
    cmd = [mlflow, "ui", "--host", args.host, "--port", str(args.port)]  # the store's URL not on `ps`
    base = f"http://{args.host}:{args.port}"
    print(f"MLflow UI on {base} (store {uri}); Ctrl-C stops it", flush=True)
    for e in experiments[:5]:  # newest first; the Model training view, not the GenAI one
        print(f"  {e.name}: {tracking.experiment_url(base, e.experiment_id)}", flush=True)
    os.execve(cmd[0], cmd, {**os.environ, "MLFLOW_BACKEND_STORE_URI": uri})


def cmd_dashboard(args):
    exe = shutil.which("optuna-dashboard", path=str(Path(sys.executable).parent)) or shutil.which("optuna-dashboard")
    if exe is None:
        raise BenchError("optuna-dashboard is not installed: .venv/bin/pip install optuna-dashboard")
    from bench import locations

    url = args.storage or locations.default_storage(_results(args))
    print(f"optuna-dashboard on http://{args.host}:{args.port} (storage {locations.redact(url)}); Ctrl-C stops it",
          flush=True)
    os.execv(exe, [exe, url, "--host", args.host, "--port", str(args.port)])


def cmd_services(args):
    from bench import services
    from bench.locations import redact

    directory = _results(args) / "services"
    if args.action == "stop":
        stopped = services.stop(directory)
        print(f"stopped: {', '.join(stopped)}" if stopped else f"no services running for {directory}")
        return 0
    s = services.start(directory, args.pg_port, args.mlflow_port)
    print(f"optuna storage:  {redact(s.storage)}\nmlflow server:   {s.tracking_uri} (artifacts in "
          f"{directory / 'artifacts'})\nboth on 127.0.0.1; the password is in {directory / 'env'} (mode 600).\n"
          f"Point bench at them with:  . {directory / 'env'}   (then make sweep, bench worker ... as usual)\n"
          "stop them with: make services-stop")
    return 0


def cmd_perf(args):
    from bench.perf import main as perf

    print(perf(quick=args.quick, out=args.out))
    return 0


def build_parser() -> argparse.ArgumentParser:
    from bench.config import RunConfig, field_types

    parser = _Parser(prog="bench", description="Train, evaluate, track and compare autoencoder variants.")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)

    p = sub.add_parser("list", help="what the harness knows: models, losses, archs, datasets, presets, metrics")
    p.add_argument("kind", nargs="?", choices=["models", "losses", "archs", "datasets", "presets", "metrics"])
    p.add_argument("pattern", nargs="?", help="fnmatch pattern or part of a name, e.g. 'seed*' or 'gauss'")
    p.set_defaults(func=cmd_list)

    p = sub.add_parser("train", help="train, evaluate and track one model")
    p.add_argument("--preset", help="start from a named config (bench list presets)")
    defaults = RunConfig()
    for name, kind in field_types().items():
        p.add_argument(f"--{name.replace('_', '-')}", dest=name, type=kind, default=None,
                       help=f"default {getattr(defaults, name)!r}")
    p.add_argument("--experiment", default="train", help="MLflow experiment (default: train)")
    p.add_argument("--tracking-uri", help="MLflow tracking URI (default sqlite:///<results>/mlflow.db)")
    _add_results(p)
    p.set_defaults(func=cmd_train)

    for name, func, text in (("sweep", cmd_sweep, "run every cell of a study spec (resumes)"),
                             ("worker", cmd_worker, "take queued trials of a prepared study until none is left")):
        p = sub.add_parser(name, help=text)
        p.add_argument("spec", help="experiments/*.toml")
        p.add_argument("--storage", help="Optuna storage URL (default sqlite:///<results>/optuna.db)")
        p.add_argument("--tracking-uri", help="MLflow tracking URI (default sqlite:///<results>/mlflow.db)")
        p.add_argument("--epochs", type=int, help="override the spec's epochs")
        _add_results(p)
        p.add_argument("--stack", type=_positive, metavar="G",
                       help="train up to G compatible trials at once as one stacked model (default: "
                       "bench.worker.DEFAULT_STACK for the device; 1 trains one at a time)")
        if name == "sweep":
            p.add_argument("--workers", type=int, default=1, help="local worker processes (default 1; 0 only queues the cells for `bench worker`)")
            p.add_argument("--dry-run", action="store_true", help="print the cells and a time estimate only")
            p.add_argument("--restart", action="store_true",
                           help="delete the study's trials and MLflow runs first (after changing its spec on purpose)")
        else:
            p.add_argument("--threads", type=_positive, help="torch threads (default: torch's)")
            p.add_argument("--worker-id", type=int, default=1)
        p.set_defaults(func=func)

    p = sub.add_parser("report", help="write the comparison report of a study from MLflow")
    p.add_argument("experiment", nargs="?", help="study / MLflow experiment (default: the latest)")
    p.add_argument("--tracking-uri")
    p.add_argument("--storage", help="Optuna storage URL (default sqlite:///<results>/optuna.db): a search's plots")
    _add_results(p)
    p.set_defaults(func=cmd_report)

    p = sub.add_parser("table", help="run a paper's study and print our numbers beside the published ones")
    p.add_argument("name", help="exemplar2020 | burda2015 | kingma2013 | seed | all")
    p.add_argument("--full", action="store_true", help="the paper's budget instead of the CPU one")
    p.add_argument("--publish", metavar="DIR", help="also write the table, results.json and curves to DIR "
                   "(e.g. docs/reproductions/exemplar2020)")
    p.add_argument("--workers", type=int, default=1)
    _add_results(p)
    p.set_defaults(func=cmd_table)

    p = sub.add_parser("perf", help="measure training speed against baselines run alongside (JSON + a table)")
    p.add_argument("--quick", action="store_true", help="fewer images and rounds (about a minute)")
    p.add_argument("--out", help="also write the figures as JSON to this file")
    p.set_defaults(func=cmd_perf)

    p = sub.add_parser("services", help="start or stop a local PostgreSQL + MLflow server (scale-out)")
    p.add_argument("action", choices=["start", "stop"])
    p.add_argument("--pg-port", type=_port, help="PostgreSQL port (default: a free one)")
    p.add_argument("--mlflow-port", type=_port, help="MLflow server port (default: a free one)")
    _add_results(p)
    p.set_defaults(func=cmd_services)

    for name, func, port in (("ui", cmd_ui, 5000), ("dashboard", cmd_dashboard, 8080)):
        p = sub.add_parser(name, help="mlflow ui on the study's store" if name == "ui" else "optuna-dashboard")
        p.add_argument("--host", default="127.0.0.1")
        p.add_argument("--port", type=_port, default=port)
        p.add_argument("--tracking-uri" if name == "ui" else "--storage")
        _add_results(p)
        p.set_defaults(func=func)
    return parser


class _Redacting:
    """A text stream that writes everything with URL passwords replaced by *** (printed lines,
    errors, library logs and tracebacks alike)."""

    def __init__(self, stream):
        self._stream = stream

    def write(self, text: str) -> int:
        from bench.locations import redact

        return self._stream.write(redact(text))

    def __getattr__(self, name):
        return getattr(self._stream, name)


def main(argv: list[str] | None = None) -> int:
    streams = sys.stdout, sys.stderr
    if not isinstance(sys.stdout, _Redacting):
        sys.stdout, sys.stderr = _Redacting(sys.stdout), _Redacting(sys.stderr)
    try:
        return _main(argv)
    finally:
        sys.stdout, sys.stderr = streams


def _stdout_closed() -> bool:
    """Whether stdout is a pipe whose reader has gone (poll says POLLERR); if so, stdout goes to
    /dev/null so that the exit's flush is quiet. Any other broken pipe is an error to report."""
    try:
        poller = select.poll()
        poller.register(sys.stdout.fileno(), select.POLLOUT)
        if not any(events & select.POLLERR for _, events in poller.poll(0)):
            return False
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return True
    except (AttributeError, OSError, ValueError):  # no poll (Windows), or stdout is no file
        return False


def _main(argv: list[str] | None) -> int:
    try:
        args = build_parser().parse_args(argv)
    except SystemExit as e:  # a bad argument (its line is written) or --help: a status, as any command
        return e.code if isinstance(e.code, int) else 2
    try:
        code = args.func(args)
        sys.stdout.flush()  # a reader gone meets us here, inside the handlers, not at the exit
        return code
    except BenchError as e:
        print(f"bench: error: {e}", file=sys.stderr)
        return e.exit_code
    except OSError as e:  # a results directory that cannot be written, a file that vanished...
        if isinstance(e, BrokenPipeError) and _stdout_closed():
            return 141  # the reader stopped early (`bench list | head`): quiet, as a tool killed by SIGPIPE
        where = f" ({e.filename})" if getattr(e, "filename", None) else ""
        print(f"bench: error: {e.strerror or e}{where}; check the path and its permissions "
              "(--results, the spec, the data files)", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("bench: interrupted; a study resumes where it stopped when run again", file=sys.stderr)
        return 130
