"""The statistics behind a report, on constructed tables (as `load_runs` returns them): the
"BCE or MSE?" verdict follows from its counts by one rule after Holm's correction, conditional
numbers are marked, and metrics a run did not measure are absent, never 0."""

import numpy as np
import pandas as pd
import pytest
from scipy import stats

from bench.registry import METRICS, Entry
from bench.report.document import summary_table
from bench.report.stats import (SAMPLE_QUALITY, cell_label, facts, holm, loss_verdict, paired_differences,
                                study_objective, summarize)

STRONG = [5.0, 5.2, 4.8]      # bce − mse per seed: mean 5, sd 0.2, p = 0.0005 (t test, 2 df)
NOISE = [[0.5, -0.5, 0.1], [0.3, -0.2, -0.1], [1.0, -1.0, 0.2], [0.2, 0.1, -0.4]]
LONE = [1.0, 1.2, 0.8]        # mean 1, sd 0.2: p = 0.013 alone, 0.052 after Holm over 4 cells
LATENTS = (2, 8, 16, 32)


def grid_runs(differences: dict[str, list[list[float]]], models=("vae",)) -> pd.DataFrame:
    """Finished runs of a grid model × loss × latent (seeds 0-2) as `load_runs` returns them:
    on each metric the mse run scores 10 and the bce run 10 + differences[metric][cell][seed],
    cell counting latent sizes. Both likelihoods are densities on the data."""
    rows = []
    for model in models:
        for i, latent in enumerate(LATENTS[:len(next(iter(differences.values())))]):
            for seed in range(3):
                for loss in ("bce", "mse"):
                    rows.append({"cell": f"model={model},loss={loss},latent={latent},seed={seed}",
                                 "run_id": f"{model}-{loss}-{latent}-{seed}", "state": "FINISHED",
                                 "model": model, "loss": loss, "latent": latent, "seed": seed,
                                 "proper_density": True, "objective": 1.0, "objective_metric": "val/bce",
                                 "objective_direction": "minimize",
                                 **{m: 10.0 + (cells[i][seed] if loss == "bce" else 0.0)
                                    for m, cells in differences.items()}})
    return pd.DataFrame(rows)


def verdict_of(differences):
    paired = paired_differences(grid_runs(differences))
    return paired, loss_verdict(paired)


def test_holm_adjusts_the_sorted_p_values_and_keeps_them_monotone():
    # sorted 0.005, 0.01, 0.03, 0.04 times 4, 3, 2, 1: 0.02, 0.03, 0.06, 0.04 -> 0.06 (monotone)
    adjusted = holm(np.array([0.01, 0.04, 0.03, 0.005, np.nan]))
    assert adjusted[:4] == pytest.approx([0.03, 0.06, 0.06, 0.02])
    assert np.isnan(adjusted[4])  # an untested cell is not in the family
    assert holm(np.array([0.6, 0.9])).tolist() == [1.0, 1.0]


def test_the_paired_p_is_students_t_and_holm_runs_over_the_cells_of_one_metric():
    paired, _ = verdict_of({"test/bce": [STRONG, *NOISE[:3]]})
    first = paired.iloc[0]
    assert first["p"] == pytest.approx(stats.ttest_1samp(STRONG, 0).pvalue)
    assert first["p_holm"] == pytest.approx(4 * first["p"])  # the smallest of four
    assert first["verdict"] == "mse better"  # bce − mse > 0 and lower is better


def test_all_one_way_supports_or_contradicts_the_seed():
    _, text = verdict_of({"test/bce": [STRONG] * 4, "test/mse": [STRONG] * 4})
    assert "on test/bce (lower is better), bce is better in 0 and mse in 4 of 4 cells" in text
    assert "on test/mse (lower is better), bce is better in 0 and mse in 4 of 4 cells" in text
    assert "So the measured numbers support it: every difference that survives the correction favours mse." in text
    _, text = verdict_of({"test/bce": [[-d for d in STRONG]] * 4, "test/mse": NOISE})
    assert "contradict it: every difference that survives the correction favours bce" in text
    assert "Holm's correction" in text


def test_a_lone_opposite_win_that_does_not_survive_correction_is_not_a_split():
    paired, text = verdict_of({"test/bce": [[-d for d in STRONG]] * 4, "test/mse": [LONE, *NOISE[:3]]})
    lone = paired[paired["metric"] == "test/mse"].iloc[0]
    assert lone["ci_low"] > 0 and lone["p"] < 0.05  # alone, its interval excludes 0 ...
    assert lone["p_holm"] >= 0.05 and lone["verdict"] == "no clear difference"  # ... not in a family of 4
    assert "on test/mse (lower is better), bce is better in 0 and mse in 0 of 4 cells, 4 undecided" in text
    assert "contradict it" in text and "split" not in text and "typically" not in text


def test_wins_for_both_losses_are_a_split_named_by_yardstick():
    _, text = verdict_of({"test/bce": [[-d for d in STRONG]] * 4, "test/mse": [STRONG] * 4})
    assert ("So the measured numbers are split: bce wins cells on test/bce and mse on test/mse, so "
            "neither loss is better on every yardstick.") in text
    _, text = verdict_of({"test/bce": [[-d for d in STRONG]] * 2 + [STRONG] * 2})
    assert "bce is better in 2 and mse in 2 of 4 cells" in text and "split" in text


def test_no_difference_does_not_settle_it():
    _, text = verdict_of({"test/bce": NOISE, "test/mse": NOISE})
    assert "bce is better in 0 and mse in 0 of 4 cells, 4 undecided" in text
    assert text.endswith("So the measured numbers do not settle it: no difference survives the correction.")


def test_without_a_bce_mse_pair_the_verdict_says_it_cannot_check():
    runs = grid_runs({"test/bce": NOISE})
    assert "cannot check" in loss_verdict(paired_differences(runs[runs["loss"] == "bce"]))


@pytest.fixture
def quality_facts(monkeypatch):
    """The sample-quality metrics' facts as bench.quality declares them; declared here for a
    registry whose entries do not (yet) carry them."""
    declared = {"fd": {"fd": "lower"}, "precision-recall": {"precision": "higher", "recall": "higher"},
                "class-entropy": {"class_entropy": "higher"}, "cond-acc": {"cond_acc": "higher"},
                "probe": {"probe_acc": "higher"}}
    for name, better in declared.items():
        if any(facts(f"test/{m}")["better"] is None for m in better):
            old = METRICS._entries.get(name, Entry(name, None))
            monkeypatch.setitem(METRICS._entries, name, Entry(name, old.obj, {**old.meta, "better": better}))


def test_sample_quality_metrics_are_yardsticks_each_way_it_is_better(quality_facts):
    assert {"test/fd", "test/precision", "test/cond_acc"} <= set(SAMPLE_QUALITY)
    # bce − mse > 0: on fd (lower is better) mse wins, on precision (higher is better) bce wins
    _, text = verdict_of({"test/fd": [STRONG] * 4, "test/precision": [STRONG] * 4})
    assert "on test/fd (lower is better), bce is better in 0 and mse in 4 of 4 cells" in text
    assert "on test/precision (higher is better), bce is better in 4 and mse in 0 of 4 cells" in text
    assert "split" in text


def test_metrics_a_model_did_not_measure_are_absent_never_zero(quality_facts):
    runs = grid_runs({"test/bce": [STRONG], "test/fd": [STRONG]}, models=("vae", "ae"))
    runs.loc[runs["model"] == "ae", "test/fd"] = np.nan
    summary = summarize(runs)
    assert set(summary.loc[summary["model"] == "ae", "metric"]) == {"objective", "test/bce"}
    header, rows = summary_table(summary, ["model", "loss", "latent"], ("test/bce", "test/fd"))
    assert header[-1] == "test/fd (lower is better)"
    assert [row[-1] for row in rows] == ["15.00 ± 0.20 (n=3)", "10.00 ± 0.00 (n=3)", "—", "—"]
    paired = paired_differences(runs)
    assert set(paired.loc[paired["model"] == "ae", "metric"]) == {"test/bce"}


def test_a_conditional_models_numbers_are_marked_and_its_marginal_nll_is_not():
    rows = [{"cell": f"model={m},latent=8,seed={s}", "run_id": f"{m}{s}", "state": "FINISHED",
             "model": m, "loss": "bce", "latent": 8, "seed": s, "proper_density": True,
             "objective": 1.0, "objective_metric": "val/bce", "objective_direction": "minimize",
             "test/nll": 90.0 + s if m == "cvae" else 95.0 + s,
             "test/nll_marginal": 96.0 + s if m == "cvae" else np.nan}
            for m in ("vae", "cvae") for s in range(3)]
    summary = summarize(pd.DataFrame(rows)).set_index(["model", "metric"])
    assert summary.loc[("cvae", "test/nll"), "conditional"]            # log p(x|y)
    assert not summary.loc[("cvae", "test/nll_marginal"), "conditional"]  # log p(x)
    assert not summary.loc[("vae", "test/nll"), "conditional"]
    header, table = summary_table(summary.reset_index(), ["model"], ("test/nll", "test/nll_marginal"))
    assert table == [["vae", "96.00 ± 1.00 (n=3)", "—"],
                     ["cvae", "91.00 ± 1.00 (n=3)‡", "97.00 ± 1.00 (n=3)"]]


def test_a_cell_label_names_numbers_keeps_strings_and_falls_back_to_the_model():
    frame = pd.DataFrame({"model": ["vae", "ae"], "latent": [2, 32], "lr": [1e-3, 0.5]})
    assert list(cell_label(frame, ["model", "latent", "lr"])) == ["vae · latent=2 · lr=0.001",
                                                                  "ae · latent=32 · lr=0.5"]
    assert list(cell_label(frame, [])) == ["vae", "ae"]


def test_the_study_objective_is_the_one_every_tagged_run_shares():
    def runs(*pairs):
        return pd.DataFrame({"objective_metric": [m for m, _ in pairs], "objective_direction": [d for _, d in pairs]})

    tagged = ("val/elbo", "maximize")
    assert study_objective(runs(tagged, ("", ""), tagged)) == tagged  # an untagged run is left out
    assert study_objective(runs(tagged, ("val/bce", "minimize"))) == ("", "")  # no shared one
    assert study_objective(runs(("", ""))) == ("", "")
