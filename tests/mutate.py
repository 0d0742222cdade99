"""Mutation testing of the modules that decide the numbers (`make mutate`; not in CI: too slow
for 2 cores). For each module, mutmut 3 mutates it one change at a time in a copy of the
repository and runs the tests that cover it; a mutant the tests still pass "survived". Writes
`results/mutation/scores.md` (score per module) and `scores.json` (every survivor by name, to
be killed by a test or explained in docs/mutation.md).

    python tests/mutate.py [MODULE ...]     # default: every module below
    python tests/mutate.py --rescore MODULE  # counts again after re-running survivors by name
"""

from __future__ import annotations

import fnmatch
import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import libcst as cst

REPO = Path(__file__).resolve().parents[1]
OUT = REPO / "results" / "mutation"
# module -> the tests that claim to cover it (fast ones: each mutant runs them)
TARGETS = {
    "bench/losses.py": ["tests/test_losses.py"],
    "bench/evaluate.py": ["tests/test_evaluate.py"],
    "bench/models/vae.py": ["tests/test_models.py", "tests/test_evaluate.py"],
    "bench/models/iwae.py": ["tests/test_models.py"],
    "bench/models/ae.py": ["tests/test_models.py"],
    "bench/models/cvae.py": ["tests/test_models.py"],
    "bench/report/stats.py": ["tests/test_report_stats.py"],
    "bench/queue.py": ["tests/test_queue.py"],
    # the recovery functions, which live beside the code they recover (only they are mutated)
    "bench/train.py": ["tests/test_resume.py"],
    "bench/tracking.py": ["tests/test_resume.py", "tests/test_tracking.py"],
    "bench/worker.py": ["tests/test_resume.py"],
    "bench/sweep.py": ["tests/test_resume.py"],
}
# modules mutated only in these functions; every other module in all of its code
ONLY = {
    "bench/train.py": ["save_state", "load_state", "_rng_states", "_set_rng_states"],
    "bench/tracking.py": ["resumable_run", "reopen_run", "fail_orphaned_runs"],
    "bench/worker.py": ["resumable"],
    "bench/sweep.py": ["_end_orphaned_runs"],
}


def _selected(module: str) -> list[str]:
    """mutmut name patterns of the functions `module` is mutated in (empty: all of it)."""
    dotted = module.removesuffix(".py").replace("/", ".")
    return [f"{dotted}.x_{name}__mutmut_*" for name in ONLY.get(module, [])]


def run_module(module: str, tests: list[str], rescore: bool = False) -> dict:
    """Mutate `module` in a fresh copy of the repository; return its counts and survivors.
    With `rescore`, only read the counts again from the last run's copy (after re-running
    named survivors there with `mutmut run NAME ...` against new tests)."""
    work = OUT / "work" / module.replace("/", "_")
    if rescore:
        return _scores(module, tests, work)
    shutil.rmtree(work, ignore_errors=True)
    shutil.copytree(REPO, work, ignore=shutil.ignore_patterns(".git", ".venv", "results", "mutants",
                                                               "__pycache__", "*.egg-info"))
    selection = json.dumps([*tests, "-m", "not slow", "-p", "no:cacheprovider"])
    undecorate(work / module)
    with open(work / "pyproject.toml", "a") as f:
        f.write(f'\n[tool.mutmut]\nsource_paths = ["{module}"]\npytest_add_cli_args_test_selection = '
                f'{selection}\nalso_copy = ["bench", "experiments", "tests"]\n')
    subprocess.run([sys.executable, "-m", "mutmut", "run", "--max-children", "1", *_selected(module)], cwd=work,
                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return _scores(module, tests, work)


def _scores(module: str, tests: list[str], work: Path) -> dict:
    listing = subprocess.run([sys.executable, "-m", "mutmut", "results", "--all", "true"], cwd=work,
                             capture_output=True, text=True).stdout
    statuses = dict(re.findall(r"^\s+(\S+): (.+)$", listing, flags=re.M))
    if patterns := _selected(module):
        statuses = {n: s for n, s in statuses.items() if any(fnmatch.fnmatch(n, p) for p in patterns)}
    killed = sum(1 for s in statuses.values() if s == "killed")
    # a mutant no test runs ("no tests") survives as surely as one the tests pass: both count
    survived = sorted(name for name, s in statuses.items() if s in ("survived", "no tests"))
    diffs = {name: _diff(work, name) for name in survived}
    counted = sum(1 for s in statuses.values() if s in ("killed", "survived", "timeout", "no tests"))
    timeouts = sum(1 for s in statuses.values() if s == "timeout")
    return {"module": module, "tests": tests, "mutants": len(statuses), "killed": killed + timeouts,
            "survived": survived, "diffs": diffs,
            "untested": sorted(name for name, s in statuses.items() if s == "no tests"),
            "score": (killed + timeouts) / counted if counted else None,
            "other": sorted({s for s in statuses.values()} - {"killed", "survived", "timeout", "no tests"})}


KEPT = ("staticmethod", "classmethod")  # decorators mutmut itself handles


class _Undecorate(cst.CSTTransformer):
    """`@d1 @d2 def f` -> `def f` then `f = d1(d2(f))`: the same object under the same name, so
    mutmut (which skips decorated functions: `@torch.no_grad()`, registry entries, properties)
    mutates their bodies too, and its trampoline is what the decorators wrap."""

    def _expand(self, body):
        out = []
        for stmt in body:
            decorated = isinstance(stmt, cst.FunctionDef) and stmt.decorators and not (
                len(stmt.decorators) == 1 and isinstance(stmt.decorators[0].decorator, cst.Name)
                and stmt.decorators[0].decorator.value in KEPT)
            if not decorated:
                out.append(stmt)
                continue
            wrapped: cst.BaseExpression = stmt.name
            for d in reversed(stmt.decorators):
                wrapped = cst.Call(func=d.decorator, args=[cst.Arg(wrapped)])
            out += [stmt.with_changes(decorators=[]),
                    cst.SimpleStatementLine([cst.Assign([cst.AssignTarget(stmt.name)], wrapped)])]
        return out

    def leave_Module(self, original, updated):
        return updated.with_changes(body=self._expand(updated.body))

    def leave_ClassDef(self, original, updated):
        return updated.with_changes(body=updated.body.with_changes(body=self._expand(updated.body.body)))


def undecorate(path: Path) -> None:
    path.write_text(cst.parse_module(path.read_text()).visit(_Undecorate()).code)


def _diff(work: Path, name: str) -> str:
    shown = subprocess.run([sys.executable, "-m", "mutmut", "show", name], cwd=work, capture_output=True,
                           text=True).stdout
    return "\n".join(line for line in shown.splitlines() if line.startswith(("-", "+"))
                     and not line.startswith(("---", "+++")))


def main(modules: list[str], rescore: bool = False) -> None:
    OUT.mkdir(parents=True, exist_ok=True)
    path = OUT / "scores.json"
    for module in modules or list(TARGETS):
        print(f"mutating {module} ...", flush=True)
        result = run_module(module, TARGETS[module], rescore)
        scores = json.loads(path.read_text()) if path.exists() else {}  # another run may have written
        scores[module] = result
        path.write_text(json.dumps(scores, indent=2) + "\n")
        s = scores[module]
        print(f"  {s['killed']}/{s['mutants']} killed ({(s['score'] or 0):.1%}), {len(s['survived'])} survived",
              flush=True)
    lines = ["| module | mutants | killed | score | survivors |", "|---|---|---|---|---|"]
    for module, s in scores.items():
        score = "—" if s["score"] is None else f"{s['score']:.1%}"
        lines.append(f"| `{module}` | {s['mutants']} | {s['killed']} | {score} | {len(s['survived'])} |")
    (OUT / "scores.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main([a for a in sys.argv[1:] if a != "--rescore"], rescore="--rescore" in sys.argv)
