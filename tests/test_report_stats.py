"""The statistics behind a report, on constructed tables (as `load_runs` returns them): the
"BCE or MSE?" verdict follows from its counts by one rule after Holm's correction, conditional
numbers are marked, and metrics a run did not measure are absent, never 0."""

import math
import warnings

import numpy as np
import pandas as pd
import pytest
from scipy import stats

from bench.registry import METRICS
from bench.report.document import summary_table
from bench.report.stats import (CONFIDENCE, SAMPLE_QUALITY, _verdict, better, better_text, cell_label, facts, finished,
                                grid_axes, holm, loss_verdict, mean_interval, paired_differences, paired_p,
                                study_objective, summarize)

STRONG = [5.0, 5.2, 4.8]      # bce − mse per seed: mean 5, sd 0.2, p = 0.0005 (t test, 2 df)
NOISE = [[0.5, -0.5, 0.1], [0.3, -0.2, -0.1], [1.0, -1.0, 0.2], [0.2, 0.1, -0.4]]
LONE = [1.0, 1.2, 0.8]        # mean 1, sd 0.2: p = 0.013 alone, 0.052 after Holm over 4 cells
LATENTS = (2, 8, 16, 32)


def grid_runs(differences: dict[str, list[list[float]]], models=("vae",), losses=("bce", "mse")) -> pd.DataFrame:
    """Finished runs of a grid model × loss × latent (seeds 0-2) as `load_runs` returns them:
    on each metric the runs of losses[1:] score 10 and the losses[0] run 10 +
    differences[metric][cell][seed], cell counting latent sizes. Every likelihood is a density on the data."""
    rows = []
    for model in models:
        for i, latent in enumerate(LATENTS[:len(next(iter(differences.values())))]):
            for seed in range(3):
                for loss in losses:
                    rows.append({"cell": f"model={model},loss={loss},latent={latent},seed={seed}",
                                 "run_id": f"{model}-{loss}-{latent}-{seed}", "state": "FINISHED",
                                 "model": model, "loss": loss, "latent": latent, "seed": seed,
                                 "proper_density": True, "objective": 1.0, "objective_metric": "val/bce",
                                 "objective_direction": "minimize",
                                 **{m: 10.0 + (cells[i][seed] if loss == losses[0] else 0.0)
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
    assert holm(np.array([0.04, 0.01, 0.01])).tolist() == pytest.approx([0.04, 0.03, 0.03])  # ties: 3 × 0.01 both


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


def test_sample_quality_metrics_are_yardsticks_each_way_it_is_better():
    assert {"test/fd", "test/precision", "test/cond_acc"} <= set(SAMPLE_QUALITY)
    # bce − mse > 0: on fd (lower is better) mse wins, on precision (higher is better) bce wins
    _, text = verdict_of({"test/fd": [STRONG] * 4, "test/precision": [STRONG] * 4})
    assert "on test/fd (lower is better), bce is better in 0 and mse in 4 of 4 cells" in text
    assert "on test/precision (higher is better), bce is better in 4 and mse in 0 of 4 cells" in text
    assert "split" in text


@pytest.mark.parametrize("metric", SAMPLE_QUALITY)
def test_every_sample_quality_metric_counts_in_the_verdict(metric):
    """test/cond_acc was left out: 4 cells where mse won on it never reached the sentence."""
    _, text = verdict_of({metric: [STRONG] * 4})
    assert f"on {metric} ({better(metric)} is better)" in text
    winner = "bce" if better(metric) == "higher" else "mse"  # bce − mse > 0 in every cell
    assert f"every difference that survives the correction favours {winner}" in text


def test_metrics_a_model_did_not_measure_are_absent_never_zero():
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


MEASURED = ("The seed concluded \"MSE looked better\" from samples viewed by eye. Measured ({} − {}, paired by "
            "seed; a cell counts for a loss when its paired t-test rejects no difference at 5% after Holm's "
            "correction over the cells of that metric): ")
COLUMNS = ["metric", "a", "b", "mean_a", "mean_b", "difference", "ci_low", "ci_high", "n", "p", "p_holm", "verdict"]


def without(runs, **seeds_by_latent):
    """`runs` less the given seeds of each latent size (latent_8=[2]: seed 2 of latent 8), both losses."""
    gone = [(int(key.removeprefix("latent_")), seed) for key, seeds in seeds_by_latent.items() for seed in seeds]
    return runs[[(latent, seed) not in gone for latent, seed in zip(runs["latent"], runs["seed"])]]


def test_a_metrics_facts_come_from_its_registry_entry_whatever_its_split():
    assert facts("test/elbo") == {"better": "higher", "unit": "nats per image", "likelihood": True, "given_label": True}
    assert facts("val/elbo") == facts("test/elbo") == facts("elbo")
    assert facts("test/fd")["unit"] == "squared feature distance"  # one unit per number of the entry
    assert facts("test/nll_k") == {"better": None, "unit": "", "likelihood": False, "given_label": False}
    # numbers a run logs besides evaluation's, and names nobody declares
    assert facts("trial_seconds") == {"better": "lower", "unit": "seconds", "likelihood": False, "given_label": False}
    assert facts("loss")["likelihood"] and facts("loss")["given_label"]
    assert facts("test/sharpness") == {"better": None, "unit": "", "likelihood": False, "given_label": False}
    assert [better_text(m) for m in ("test/elbo", "test/bce", "test/kl")] == [
        "higher is better", "lower is better", "neither way is better"]


@pytest.fixture
def registry(monkeypatch):
    """METRICS, where what a test registers is gone after the test."""
    monkeypatch.setattr(METRICS, "_entries", dict(METRICS._entries))
    return METRICS


def test_a_metric_registered_without_a_unit_or_any_number_is_described_anyway(registry):
    registry.register("activations")(lambda model, x: None)  # logs pictures only: no "better"
    registry.register("sharpness", better={"sharpness": "higher"})(lambda model, x: None)
    assert facts("test/sharpness") == {"better": "higher", "unit": "", "likelihood": False, "given_label": False}
    assert facts("test/unknown")["better"] is None


def test_grid_axes_are_the_cell_keys_names_else_model_loss_and_latent():
    runs = pd.DataFrame({"cell": ["model=vae,lr=0.001,seed=0", "model=vae,lr=0.01,seed=0", ""],
                         "model": "vae", "loss": "bce", "latent": 8, "lr": [0.001, 0.01, 0.001], "seed": 0})
    assert grid_axes(runs) == ["model", "lr"]  # seed is no axis; loss and latent were not searched
    outside_a_sweep = runs.assign(cell="")
    assert grid_axes(outside_a_sweep) == ["model", "loss", "latent"]
    assert grid_axes(outside_a_sweep.drop(columns="latent")) == ["model", "loss"]


def test_finished_keeps_every_run_trained_outside_a_sweep_and_the_best_trial_of_a_search():
    runs = pd.DataFrame({"cell": ["", "", "a,seed=0", "a,seed=0", "a,seed=0", "b,seed=0", "b,seed=0"],
                         "run_id": ["outside-1", "outside-2", "a1", "a2", "a3", "b1", "b2"],
                         "state": ["FINISHED"] * 6 + ["FAILED"],
                         "objective": [np.nan, np.nan, 1.0, 3.0, np.nan, 2.0, 9.0],
                         "objective_direction": ["", ""] + ["maximize"] * 5})  # untagged runs listed first
    assert finished(runs)["run_id"].tolist() == ["outside-1", "outside-2", "a2", "b1"]
    minimizing = runs.assign(objective_direction=["", ""] + ["minimize"] * 5)
    assert finished(minimizing)["run_id"].tolist() == ["outside-1", "outside-2", "a1", "b1"]  # NaN never stands


def test_interval_and_paired_p_of_two_values_are_cauchys_closed_forms():
    # Student's t with 1 degree of freedom is Cauchy: quantile tan(pi (q - 1/2)), two-sided p 1 - 2 atan(|t|) / pi.
    # 1 and 3: mean 2, sd sqrt(2), standard error 1, t = 2.
    t_975 = math.tan(math.pi * CONFIDENCE / 2)  # the quantile at 1/2 + CONFIDENCE/2
    assert mean_interval(np.array([1.0, 3.0])) == pytest.approx((2.0, 2.0 - t_975, 2.0 + t_975))
    assert paired_p(np.array([1.0, 3.0])) == pytest.approx(1 - 2 * math.atan(2) / math.pi)
    mean, low, high = mean_interval(np.array([3.0]))
    assert mean == 3.0 and np.isnan(low) and np.isnan(high) and np.isnan(paired_p(np.array([3.0])))
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # an empty cell is NaN quietly, without numpy's "Mean of empty slice"
        assert np.isnan(mean_interval(np.array([]))).all()


def test_identical_paired_differences_are_certain_unless_they_are_all_zero():
    assert paired_p(np.array([2.0, 2.0, 2.0])) == 0.0
    assert paired_p(np.array([1.0, 1.0])) == 0.0
    assert paired_p(np.zeros(3)) == 1.0


def test_the_objective_row_takes_its_direction_from_the_study_and_its_facts_from_the_objective():
    def summary_of(objective, direction):
        runs = pd.DataFrame([{"cell": f"model=cvae,latent=8,seed={s}", "run_id": str(s), "state": "FINISHED",
                              "model": "cvae", "loss": "bce", "latent": 8, "seed": s, "proper_density": False,
                              "objective": -100.0 - s, "objective_metric": objective, "objective_direction": direction,
                              "test/bce": 60.0 + s, "test/kl": 20.0 + s} for s in range(3)])
        return summarize(runs).set_index("metric")[["mean", "std", "n", "better", "comparable", "conditional"]]

    # val/elbo: nats of a bce likelihood, no density here, and a cvae's ELBO is given the label
    assert summary_of("val/elbo", "maximize").to_dict("index") == {
        "objective": {"mean": -101.0, "std": 1.0, "n": 3, "better": "higher", "comparable": False, "conditional": True},
        "test/bce": {"mean": 61.0, "std": 1.0, "n": 3, "better": "lower", "comparable": True, "conditional": True},
        "test/kl": {"mean": 21.0, "std": 1.0, "n": 3, "better": "", "comparable": True, "conditional": True}}
    # a search may maximise a number that has no better way of its own
    assert summary_of("val/active_units", "maximize").loc["objective", "better"] == "higher"
    assert summary_of("val/bce", "minimize").loc["objective", "better"] == "lower"


def test_a_summary_groups_as_asked_flags_small_cells_and_has_no_objective_without_a_shared_one():
    runs = grid_runs({"test/bce": [[0.0, 1.0, 2.0], [4.0, 4.0, 4.0]]})
    by_loss = summarize(runs, by=["loss"]).set_index(["loss", "metric"])
    assert by_loss.index.tolist() == [("bce", "objective"), ("bce", "test/bce"),
                                      ("mse", "objective"), ("mse", "test/bce")]
    assert by_loss.loc[("bce", "test/bce"), ["mean", "std", "n"]].tolist() == pytest.approx([12.5, math.sqrt(3.1), 6])
    untagged = runs.assign(objective_metric="", objective_direction="")
    assert summarize(untagged)["metric"].unique().tolist() == ["test/bce"]
    small = summarize(without(runs, latent_2=[2], latent_8=[1, 2]), metrics=("test/bce",))
    bce = small[small["loss"] == "bce"]
    assert bce[["latent", "mean", "n", "flag"]].values.tolist() == [[2, 10.5, 2, "n<3"], [8, 14.0, 1, "n<3"]]
    assert bce["std"].iloc[0] == pytest.approx(math.sqrt(0.5)) and np.isnan(bce["std"].iloc[1])


def test_paired_differences_name_their_columns_and_keep_them_when_nothing_pairs():
    runs = grid_runs({"test/bce": [STRONG, NOISE[0]]})
    paired = paired_differences(runs)
    assert list(paired.columns) == ["model", "latent", *COLUMNS]
    first = paired.iloc[0]
    assert (first["a"], first["b"], first["n"]) == ("bce", "mse", 3)
    assert [first[c] for c in ("mean_a", "mean_b", "difference", "ci_low")] == pytest.approx(
        [15.0, 10.0, 5.0, 5.0 - stats.t.ppf(0.975, 2) * 0.2 / math.sqrt(3)])
    by_latent = paired_differences(runs, by=["latent"])
    assert list(by_latent.columns) == ["latent", *COLUMNS] and by_latent["difference"].tolist() == pytest.approx(
        paired["difference"].tolist())
    for empty in (paired_differences(runs[runs["loss"] == "bce"]),  # one loss: no pair
                  paired_differences(runs, metrics=("test/fd",))):  # a pair, but no metric it measured
        assert empty.empty and list(empty.columns) == ["model", "latent", *COLUMNS]
    assert paired_differences(runs, between="optimizer").empty  # no such column: nothing to pair


def test_the_default_pair_is_bce_minus_mse_else_the_first_two_values():
    mse_listed_first = paired_differences(grid_runs({"test/bce": [STRONG]}, losses=("mse", "bce"))).iloc[0]
    assert (mse_listed_first["a"], mse_listed_first["b"], mse_listed_first["verdict"]) == ("bce", "mse", "bce better")
    assert mse_listed_first["difference"] == pytest.approx(-5.0)
    no_bce = paired_differences(grid_runs({"test/bce": [STRONG]}, losses=("laplace", "mse", "cb"))).iloc[0]
    assert (no_bce["a"], no_bce["b"], no_bce["verdict"]) == ("laplace", "mse", "mse better")


def test_nats_of_a_likelihood_are_paired_only_where_both_are_densities():
    runs = grid_runs({"test/nll": [STRONG], "test/bce": [STRONG]})
    assert paired_differences(runs, metrics=("test/nll", "test/bce"))["n"].tolist() == [3, 3]
    runs.loc[runs["loss"] == "bce", "proper_density"] = False
    nll, bce = paired_differences(runs, metrics=("test/nll", "test/bce")).to_dict("records")
    assert (nll["n"], nll["verdict"]) == (0, "not comparable: the two likelihoods are not both densities on this data")
    assert np.isnan(nll["mean_a"]) and np.isnan(nll["difference"])
    assert (bce["n"], bce["verdict"]) == (3, "mse better")  # the bce yardstick is measured the same way for both


def test_a_metric_without_a_better_way_gets_its_interval_but_no_test():
    kl = paired_differences(grid_runs({"test/kl": [STRONG]}), metrics=("test/kl",)).iloc[0]
    assert kl["difference"] == pytest.approx(5.0) and kl["ci_low"] > 0
    assert np.isnan(kl["p"]) and np.isnan(kl["p_holm"]) and kl["verdict"] == "interval only"


def test_cells_with_two_seeds_are_tested_and_with_one_are_counted_apart():
    runs = without(grid_runs({"test/bce": [STRONG] * 3, "test/mse": [NOISE[0]] * 3}), latent_8=[2], latent_16=[1, 2])
    paired = paired_differences(runs)
    bce = paired[paired["metric"] == "test/bce"]
    assert bce["n"].tolist() == [3, 2, 1]
    assert bce["verdict"].tolist() == ["mse better", "mse better", "n < 2: no interval"]  # 2 seeds: p 0.0125
    assert loss_verdict(paired) == MEASURED.format("bce", "mse") + (
        "on test/bce (lower is better), bce is better in 0 and mse in 2 of 3 cells, 0 undecided, 1 with fewer than "
        "2 seeds (no test); on test/mse (lower is better), bce is better in 0 and mse in 0 of 3 cells, 2 undecided, "
        "1 with fewer than 2 seeds (no test). So the measured numbers support it: every difference that survives "
        "the correction favours mse.")


def test_the_verdict_of_one_cell_in_full():
    paired = paired_differences(grid_runs({"test/bce": [STRONG]}))
    assert loss_verdict(paired) == MEASURED.format("bce", "mse") + (
        "on test/bce (lower is better), bce is better in 0 and mse in 1 of 1 cell, 0 undecided. So the measured "
        "numbers support it: every difference that survives the correction favours mse.")
    assert loss_verdict(paired.iloc[:0]) == (
        "The seed concluded \"MSE looked better\" from samples viewed by eye; this study has no bce/mse pair on "
        "the same cells and seeds, so it cannot check that.")


def test_a_split_names_every_yardstick_each_loss_won():
    bce_lower = [[-d for d in STRONG]]  # bce wins where lower is better, mse where higher is
    _, text = verdict_of({"test/bce": bce_lower, "test/mse": bce_lower, "test/precision": bce_lower,
                          "test/recall": bce_lower})
    assert text.endswith("So the measured numbers are split: bce wins cells on test/bce, test/mse and mse on "
                         "test/precision, test/recall, so neither loss is better on every yardstick.")


def test_the_seeds_choice_is_mse_whichever_side_of_the_pair_it_is_on():
    mse_better, bce_better = grid_runs({"test/bce": [STRONG]}), grid_runs({"test/bce": [[-d for d in STRONG]]})
    assert loss_verdict(paired_differences(mse_better, pair=("mse", "bce"))) == MEASURED.format("mse", "bce") + (
        "on test/bce (lower is better), mse is better in 1 and bce in 0 of 1 cell, 0 undecided. So the measured "
        "numbers support it: every difference that survives the correction favours mse.")
    assert loss_verdict(paired_differences(bce_better, pair=("mse", "bce"))).endswith(
        "So the measured numbers contradict it: every difference that survives the correction favours bce.")
    # without an mse run the second loss of the pair stands for the seed's choice
    no_mse = paired_differences(grid_runs({"test/bce": [STRONG]}, losses=("bce", "laplace")))
    assert loss_verdict(no_mse).endswith("support it: every difference that survives the correction favours laplace.")


def test_a_holm_p_exactly_at_the_level_rejects_nothing():
    row = next(paired_differences(grid_runs({"test/bce": [STRONG]})).itertuples())
    level = 1 - CONFIDENCE
    assert _verdict(row._replace(p_holm=level)) == "no clear difference"
    assert _verdict(row._replace(p_holm=np.nextafter(level, 0))) == "mse better"


def test_a_small_but_certain_difference_goes_to_the_lower_loss_where_lower_is_better():
    small = [0.5, 0.52, 0.48]  # bce − mse: below 1 nat, p = 0.0005 (t test, 2 df)
    row = paired_differences(grid_runs({"test/bce": [small]})).iloc[0]
    high = 0.5 + stats.t.ppf(0.975, 2) * 0.02 / math.sqrt(3)
    assert (row["verdict"], row["ci_high"]) == ("mse better", pytest.approx(high))


def test_a_summary_lists_every_metric_a_group_measured_with_its_flags_and_keeps_its_columns_when_empty():
    runs = grid_runs({"test/fd": [STRONG], "test/bce": [STRONG]}, models=("vae", "ae"))
    runs.loc[runs["model"] == "ae", "test/fd"] = np.nan  # the ae group measured test/bce, not test/fd
    summary = summarize(runs, metrics=("test/fd", "test/bce"), by=["model"])
    assert summary[["model", "metric"]].values.tolist() == [["vae", "test/fd"], ["vae", "test/bce"], ["ae", "test/bce"]]
    assert summary["flag"].tolist() == ["", "", ""]  # 6 runs each: no flag at 3 seeds or more
    assert summary["proper_density"].tolist() == [True, True, True]
    assert summarize(runs, metrics=("test/bce",), by=[])[["metric", "n"]].values.tolist() == [["test/bce", 12]]
    columns = ["model", "metric", "mean", "std", "n", "better", "proper_density", "comparable", "conditional", "flag"]
    assert list(summarize(runs.assign(state="FAILED"), by=["model"]).columns) == columns
    three = summarize(without(runs, latent_2=[]), metrics=("test/bce",))
    assert set(three["n"]) == {3} and set(three["flag"]) == {""}
