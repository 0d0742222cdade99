"""The report as text: tables of the statistics (markdown, LaTeX) and the document rendered from
bench/templates/ (`report.j2` holds the words once; `md.j2` and `html.j2` write each block;
`captions.j2` the figures' and the LaTeX table's captions).
Marks: * fewer than MIN_SEEDS seeds, † nats of a likelihood that is not a density on the data,
‡ a conditional model's number given the true label (log p(x|y))."""

from __future__ import annotations

import html
import re
from pathlib import Path

import jinja2
import pandas as pd

from bench.report.stats import CONFIDENCE, MIN_SEEDS, better_text, cell_label, groups

LATEX_ESCAPES = {"\\": r"\textbackslash{}", "&": r"\&", "%": r"\%", "#": r"\#", "_": r"\_",
                 "{": r"\{", "}": r"\}", "~": r"\textasciitilde{}", "^": r"\^{}",
                 "±": r"$\pm$", "−": "$-$", "†": r"$^\dagger$", "‡": r"$^\ddagger$",
                 "·": r"$\cdot$", "—": "--", "Δ": r"$\Delta$"}


def _or_dash(value, text: str) -> str:
    return "—" if pd.isna(value) else text


def format_stat(mean: float, std: float, n: int, digits: int = 2, latex: bool = False, marks: str = "",
                se: bool = False) -> str:
    """"123.45 ± 0.67 (n=3)", or with `se` "123.45 ± 0.67 (n=3, se 0.39)" (the standard error of the
    mean, sd / sqrt(n)); a "*" when n < MIN_SEEDS and `marks` (e.g. "†") appended."""
    if n == 0 or pd.isna(mean):
        return "--" if latex else "—"
    pm = r" $\pm$ " if latex else " ± "
    spread = "" if pd.isna(std) else f"{pm}{std:.{digits}f}"
    error = f", se {std / n ** 0.5:.{digits}f}" if se and not pd.isna(std) else ""
    return f"{mean:.{digits}f}{spread} (n={n}{error}){'*' if n < MIN_SEEDS else ''}{marks}"


def markdown_table(header: list[str], rows: list[list[str]]) -> str:
    def line(cells):
        return "| " + " | ".join(str(c).replace("|", "\\|") for c in cells) + " |"

    return "\n".join([line(header), "|" + "|".join("---" for _ in header) + "|", *map(line, rows)])


def latex_escape(text: str) -> str:
    """Plain text (with ±, †, ‡, · and —) as LaTeX; `$...$` runs are kept as math."""
    return "".join(p if len(p) > 1 and p[0] == p[-1] == "$" else "".join(LATEX_ESCAPES.get(ch, ch) for ch in p)
                   for p in re.split(r"(\$[^$]*\$)", str(text)))


def latex_table(header: list[str], rows: list[list[str]], caption: str, label: str) -> str:
    """A booktabs table (needs \\usepackage{booktabs}); cells are escaped text."""
    body = [" & ".join(map(latex_escape, row)) + r" \\" for row in [header, *rows]]
    return "\n".join([r"\begin{table}[ht]", r"\centering", r"\small", rf"\begin{{tabular}}{{{'l' * len(header)}}}",
                      r"\toprule", body[0], r"\midrule", *body[1:], r"\bottomrule", r"\end{tabular}",
                      rf"\caption{{{latex_escape(caption)}}}", rf"\label{{{label}}}", r"\end{table}", ""])


def summary_table(summary: pd.DataFrame, axes: list[str], metrics, latex: bool = False):
    """Header and rows of the cells × metrics table, "mean ± std (n=…)" with the marks."""
    present = [m for m in metrics if m in set(summary["metric"])]
    ways = summary.drop_duplicates("metric").set_index("metric")["better"]
    header = [*axes, *(f"{m} ({ways[m] + ' is better' if ways[m] else 'neither way is better'})" for m in present)]

    def cell(by_metric: pd.DataFrame, m: str) -> str:
        if m not in by_metric.index:
            return "--" if latex else "—"
        r, digits = by_metric.loc[m], 1 if m in ("test/active_units", "trial_seconds") else 2
        marks = ("" if r["comparable"] else "†") + ("‡" if r["conditional"] else "")
        return format_stat(r["mean"], r["std"], int(r["n"]), digits, latex, marks)

    return header, [[*map(str, keys), *(cell(group.set_index("metric"), m) for m in present)]
                    for keys, group in groups(summary, axes)]


def differences_table(paired: pd.DataFrame):
    """Header and rows of `paired_differences`: difference, CI, n, Holm's p and the verdict."""
    by = list(paired.columns[:list(paired.columns).index("metric")])
    header = [*by, "metric", f"{paired['a'].iloc[0]} − {paired['b'].iloc[0]}",
              f"{CONFIDENCE:.0%} CI", "n", "p (Holm)", "verdict"]
    rows = [[*(str(r[c]) for c in by), r["metric"], _or_dash(r["difference"], f"{r['difference']:+.2f}"),
             _or_dash(r["ci_low"], f"[{r['ci_low']:+.2f}, {r['ci_high']:+.2f}]"),
             f"{r['n']}{'*' if 0 < r['n'] < MIN_SEEDS else ''}", _or_dash(r["p_holm"], f"{r['p_holm']:.3g}"),
             r["verdict"]] for _, r in paired.iterrows()]
    return header, rows


def best_trials_table(done: pd.DataFrame, params: list[str], metrics, direction: str, top: int = 5,
                      axes: list[str] = ()):
    """The `top` finished trials by the objective, with their cell (where a grid has `axes`),
    sampled values and test metrics."""
    best = done.sort_values("objective", ascending=direction != "maximize").head(top)
    shown = [m for m in metrics if m in best and best[m].notna().any()]
    cells = list(cell_label(best, list(axes))) if axes else [None] * len(best)
    rows = [[str(r["trial"]), *([cell] if axes else []), f"{r['objective']:.2f}",
             *(f"{r[p]:.4g}" if isinstance(r[p], float) else str(r[p]) for p in params),
             *(_or_dash(r[m], f"{r[m]:.2f}") for m in shown),
             _or_dash(r.get("trial_seconds"), f"{r.get('trial_seconds', 0):.1f}")]
            for cell, (_, r) in zip(cells, best.iterrows())]
    return ["trial", *(["cell"] if axes else []), "objective", *params, *shown, "seconds"], rows


def other_trials_table(other: pd.DataFrame):
    """Failed, diverged, pruned and running trials with the epoch each stopped at and why."""
    return (["trial", "cell", "state", "stopped at epoch", "seconds", "reason"],
            [["" if pd.isna(r["trial"]) else str(r["trial"]), r["cell"] or r["run_name"], r["state"],
              _or_dash(r["last_epoch"], str(r["last_epoch"])), _or_dash(r["wall_seconds"], f"{r['wall_seconds']:.1f}"),
              (r["fail_reason"] or "—").splitlines()[0][:200]] for _, r in other.iterrows()])


def _inline(text) -> str:
    """Escaped text with the markdown the report writes: `code` and **bold**."""
    text = re.sub(r"`([^`]+)`", r"<code>\1</code>", html.escape(str(text)))
    return re.sub(r"\*\*([^*]+)\*\*", r"<strong>\1</strong>", text)


ENVIRONMENT = jinja2.Environment(loader=jinja2.FileSystemLoader(Path(__file__).resolve().parents[1] / "templates"),
                                 undefined=jinja2.StrictUndefined, trim_blocks=True, lstrip_blocks=True,
                                 keep_trailing_newline=True)
ENVIRONMENT.filters.update(inline=_inline, oneline=lambda text: " ".join(str(text).split()), better=better_text)
ENVIRONMENT.globals.update(markdown_table=markdown_table, min_seeds=MIN_SEEDS)


def caption(name: str, **values) -> str:
    """Macro `name` of captions.j2 on `values`, as one line: the template breaks its sentences
    across lines, so every run of whitespace is one space."""
    return " ".join(str(getattr(ENVIRONMENT.get_template("captions.j2").module, name)(**values)).split())


def render(report: dict) -> tuple[str, str]:
    """(markdown, self-contained HTML) of the report described by `report` (see write_report)."""
    template = ENVIRONMENT.get_template("report.j2")
    markdown = re.sub(r"\n\s*\n", "\n\n", template.render(report, format="md")).strip() + "\n"
    return markdown, template.render(report, format="html")
