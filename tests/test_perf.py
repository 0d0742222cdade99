"""`bench perf` measures and reports; it asserts no speed (benchmarks are never timed tests)."""

import math

import pytest

from bench import perf


@pytest.mark.slow
def test_perf_measures_every_figure_it_names_and_prints_the_machine(tmp_path):
    result = perf.run(quick=True, rounds=1)
    for key in ("trainer_samples_per_s", "naive_samples_per_s", "gemm_samples_per_s", "gemm_ew_samples_per_s",
                "iwae_images_per_s", "iwae_fused_images_per_s", "peak_rss_mb"):
        assert result[key] > 0 and math.isfinite(result[key]), key
    assert result["gemm_ew_fraction"] == pytest.approx(result["trainer_samples_per_s"] / result["gemm_ew_samples_per_s"])
    table = perf.markdown(result)
    assert result["machine"]["torch"] in table and "| `trainer_samples_per_s` |" in table
    assert set(result["stacked"]) == {"1", "4", "16", "64"} and all(v > 0 for v in result["stacked"].values())
    assert result["stacked_speedup"] == pytest.approx(max(result["stacked"].values()) / result["stacked"]["1"])
    assert "N=16" in table
    assert result["default_sweep_speedup"] is None  # whole studies: not in --quick; said, not invented
    from bench import peers
    if peers.available():
        ratio = result["trainer_samples_per_s"] / result["pythae_samples_per_s"]
        assert result["speedup_vs_pythae"] == pytest.approx(ratio)
        assert result["speedup_vs_pythae_nll"] > 0 and "pythae" in result["nll_vs_pythae"]
        assert result["speedup_vs_pythae_nll_fused"] > 0 and result["iwae_compile_s"] >= 0
        assert result["nll_vs_pythae"]["fused_max_gap"] < 1e-3  # compiled or not, the same log p(x)
        assert "| `speedup_vs_pythae` |" in table
    else:
        assert result["pythae_samples_per_s"] is None and "pythae: not installed" in table


@pytest.mark.slow
def test_a_studys_seconds_split_into_training_whole_trials_and_the_rest():
    seconds = perf.study_seconds(str(perf.EXPERIMENTS / "smoke.toml"), stack=1, workers=1)
    assert 0 < seconds["training"] < seconds["trials"] < seconds["wall"]  # one worker: trials in turn
    assert 0 < seconds["quality"] < seconds["trials"]  # the judge is trained inside the first trial


@pytest.mark.slow
def test_tracking_overhead_is_measured_in_wall_and_in_cpu_time():
    wall, cpu = perf.tracking_overhead(perf._data(quick=True), rounds=1, epochs=1)
    assert all(math.isfinite(v) and v > -0.5 for v in (wall, cpu))  # a tracked trial is never half the work
