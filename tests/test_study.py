"""The study: statistics against hand-computed values, the end-to-end compare, report regeneration."""

import hashlib
import json
import os
import subprocess
import sys

import numpy as np
import pytest

from softsig import study

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_summarize_by_hand():
    # values 1, 2, 3, 4: mean 2.5, sample variance (2.25+0.25+0.25+2.25)/3 = 5/3
    summary = study.summarize([1.0, 2.0, 3.0, 4.0])
    std = np.sqrt(5 / 3)
    half = 3.1824 * std / 2  # t_{0.975, 3} * s / sqrt(4)
    assert summary["n"] == 4 and summary["mean"] == 2.5
    np.testing.assert_allclose(summary["std"], std, rtol=1e-12)
    np.testing.assert_allclose(summary["ci95"], [2.5 - half, 2.5 + half], rtol=1e-12)
    single = study.summarize([0.3])
    assert single["mean"] == 0.3 and np.isnan(single["std"]) and np.isnan(single["ci95"][0])


def test_t_quantiles_against_scipy():
    scipy_stats = pytest.importorskip("scipy.stats")
    for df in (1, 2, 3, 5, 9, 30, 31, 50, 200):
        np.testing.assert_allclose(study.t_quantile_975(df), scipy_stats.t.ppf(0.975, df), rtol=2e-4)
    with pytest.raises(ValueError):
        study.t_quantile_975(0)


def test_unknown_loss_is_a_clear_error():
    with pytest.raises(study.ConfigError, match="valid losses are sigmoid_mse, softmax_cross_entropy"):
        study.check_losses(["sigmoid_mse", "hinge"])


def digest(path):
    with open(path, "rb") as f:
        return hashlib.sha256(f.read()).hexdigest()


ARTIFACTS = ("results.json", "report.md", "loss_curves.png", "test_error.png", "final_test_error.png")


@pytest.mark.slow
def test_tiny_compare_end_to_end_and_report_regenerates_identically(tmp_path):
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2")
    env["XLA_FLAGS"] = env.get("XLA_FLAGS", "").replace("--xla_force_host_platform_device_count=8", "")
    cmd = [
        sys.executable, os.path.join(ROOT, "experiments", "compare.py"), f"--workdir={tmp_path}",
        "--dataset=synthetic", "--train_split=train[:256]", "--test_split=test[:100]", "--epochs=2",
        "--batch_size=32", "--eval_batch_size=50", "--conv_blocks=8;16", "--dense_features=32", "--num_seeds=2",
    ]
    result = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "report:" in result.stdout and "lower mean final test error" in result.stdout
    for name in ARTIFACTS:
        assert (tmp_path / name).stat().st_size > 0, name
    results = json.loads((tmp_path / "results.json").read_text())
    assert set(results["losses"]) == {"sigmoid_mse", "softmax_cross_entropy"}
    for r in results["losses"].values():
        assert r["seeds"] == [0, 1] and r["epochs"] == [1.0, 2.0]
        assert np.asarray(r["per_seed"]["test_error_rate"]).shape == (2, 2)
    paired = results["paired_difference"]["final_test_error"]
    mse = results["losses"]["sigmoid_mse"]["per_seed"]["test_error_rate"]
    ce = results["losses"]["softmax_cross_entropy"]["per_seed"]["test_error_rate"]
    np.testing.assert_allclose(paired["mean"], np.mean([m[-1] - c[-1] for m, c in zip(mse, ce)]))
    report = (tmp_path / "report.md").read_text()
    assert "SYNTHETIC DATA" in report and "![Loss curves](loss_curves.png)" in report

    before = {name: digest(tmp_path / name) for name in ARTIFACTS}
    for name in ARTIFACTS[1:]:
        os.remove(tmp_path / name)
    again = subprocess.run([*cmd[:3], "--report_only"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert again.returncode == 0, again.stderr[-3000:]
    assert {name: digest(tmp_path / name) for name in ARTIFACTS} == before


def test_lr_sweep_reports_each_head_at_its_best_rate(tmp_path):
    from softsig.config import Config

    base = Config(dataset="synthetic", train_split="train[:256]", test_split="test[:100]", batch_size=32,
                  eval_batch_size=50, epochs=1, conv_blocks="8;16", dense_features="32", learning_rate=1e-3,
                  parallel="none")
    results = study.run_study(base, str(tmp_path), study.LOSS_NAMES, num_seeds=2, show_progress=False,
                              lr_sweep=[1e-2, 1e-3])  # the base rate listed again is not run twice
    assert sorted(os.listdir(tmp_path / "sigmoid_mse_lr0.01")) and not (tmp_path / "sigmoid_mse_lr0.001").exists()
    for loss, sweep in results["lr_sweep"].items():
        assert sweep["learning_rates"] == [1e-3, 1e-2]
        means = {rate: sweep["final_test_error"][f"{rate:g}"]["mean"] for rate in sweep["learning_rates"]}
        assert sweep["best_learning_rate"] == min(means, key=means.get)
        assert len(sweep["best_final_errors"]) == 2
        assert np.mean(sweep["best_final_errors"]) == pytest.approx(means[sweep["best_learning_rate"]])
    paired = results["lr_sweep_paired_difference"]["final_test_error"]
    mse, ce = (results["lr_sweep"][loss]["best_final_errors"] for loss in ("sigmoid_mse", "softmax_cross_entropy"))
    np.testing.assert_allclose(paired["mean"], np.mean(np.subtract(mse, ce)))
    report = (tmp_path / "report.md").read_text()
    assert "## Learning-rate sweep" in report and "best learning rate of the sweep" in report


def test_one_run_per_seed_gives_the_vmapped_results(tmp_path):
    """The CPU default (seeds one after another) and the vmapped program agree seed by seed."""
    from softsig.config import Config, ConfigError

    base = Config(dataset="synthetic", train_split="train[:256]", test_split="test[:100]", batch_size=32,
                  eval_batch_size=50, epochs=2, conv_blocks="8;16", dense_features="32", parallel="none", seed=3)
    vmapped = study.run_study(base, str(tmp_path / "v"), study.LOSS_NAMES, num_seeds=2, show_progress=False,
                              vmap_seeds=True)
    sequential = study.run_study(base, str(tmp_path / "s"), study.LOSS_NAMES, num_seeds=2, show_progress=False,
                                 vmap_seeds=False)
    assert sorted(os.listdir(tmp_path / "s" / "sigmoid_mse")) == ["seed_3", "seed_4"]
    assert sequential["setup"]["seed_mode"] == "sequential" and vmapped["setup"]["seed_mode"] == "vmapped"
    for loss in study.LOSS_NAMES:
        a, b = vmapped["losses"][loss], sequential["losses"][loss]
        assert a["seeds"] == b["seeds"] == [3, 4] and a["epochs"] == b["epochs"]
        for name in study.PER_EPOCH_METRICS:
            np.testing.assert_allclose(b["per_seed"][name], a["per_seed"][name], rtol=1e-4, atol=1e-5, err_msg=name)
        assert set(b["grad_norms"]["layers"]) == set(a["grad_norms"]["layers"])
    np.testing.assert_allclose(sequential["paired_difference"]["final_test_error"]["mean"],
                               vmapped["paired_difference"]["final_test_error"]["mean"], atol=1e-6)
    assert "(one run per seed;" in (tmp_path / "s" / "report.md").read_text()
    assert "(vmapped;" in (tmp_path / "v" / "report.md").read_text()
    with pytest.raises(ConfigError, match="vmap_seeds=false"):  # a resume must keep its layout
        study.run_study(base, str(tmp_path / "s"), study.LOSS_NAMES, num_seeds=2, show_progress=False,
                        vmap_seeds=True)
    with pytest.raises(ConfigError, match="vmap_seeds=true"):
        study.run_study(base, str(tmp_path / "v"), study.LOSS_NAMES, num_seeds=2, show_progress=False,
                        vmap_seeds=False)


def test_resolve_vmap_seeds():
    assert study.resolve_vmap_seeds(True) is True and study.resolve_vmap_seeds(False) is False
    assert study.resolve_vmap_seeds(None) is False  # these tests run on CPU


def test_stalled_seeds_are_found_from_the_gradient_norms():
    records = [{"step": step, "grad_norm": norms} for step, norms in zip(
        (50, 100, 150, 200, 250),
        ([1.0, 2.0, 1.0], [0.5, 1e-9, 0.4], [1e-8, 0.1, 0.3], [0.0, 1e-9, 0.2], [0.0, 0.0, 0.1]),
    )]
    # seed 0: low from step 150 on; seed 1: low at 100, recovers, low again from 200; seed 2 never.
    assert study.stalled_from_steps(records) == [150, 200, None]
    assert study.stalled_from_steps([{"step": 10, "grad_norm": 3.0}, {"step": 20, "grad_norm": 1e-7}]) == [20]
    assert study.stalled_from_steps([{"step": 10, "train_loss": 1.0}]) == []  # runs from before grad norms
    assert study.stalled_from_steps([]) == []


@pytest.mark.parametrize("size", ["15k", "50k"])
def test_committed_reports_regenerate_and_stalled_seeds_are_reported(size):
    """The committed CIFAR-10 reports are what the current code renders from their results.json;
    a stalled seed adds a finding with its step and final error."""
    directory = os.path.join(ROOT, "results", f"cifar10-jpeg75-{size}")
    results = json.loads(open(os.path.join(directory, "results.json")).read())
    plot_names = {key: f"{key}.png" for key in ("loss_curves", "test_error", "final_test_error", "grad_norms")
                  if os.path.exists(os.path.join(directory, f"{key}.png"))}
    assert study.render_report(results, plot_names) == open(os.path.join(directory, "report.md")).read()
    results.pop("lr_sweep", None)  # the 15k sweep has its own stalled rate; this test sets its own below
    results.pop("lr_sweep_paired_difference", None)
    mse = results["losses"]["sigmoid_mse"]
    mse["stalled_from_step"] = [None, 120, None]
    lines = [line for line in study.findings(results) if "stopped learning" in line]
    error = mse["per_seed"]["test_error_rate"][1][-1]
    base_line = (
        f"sigmoid + MSE: 1 of 3 seeds stopped learning (gradient norm below 1e-06 of its first value, for good: "
        f"dead ReLUs or saturated outputs): seed {mse['seeds'][1]} by step 120 (final test error {100 * error:.2f}%). "
        "The mean final error above includes them."
    )
    assert lines == [base_line]
    errors = [row[-1] for row in mse["per_seed"]["test_error_rate"]]
    results["lr_sweep"] = {"sigmoid_mse": {  # a swept rate where every seed stalled
        "learning_rates": [0.001, 0.003], "best_learning_rate": 0.001, "best_final_errors": errors,
        "final_test_error": {"0.001": study.summarize(errors), "0.003": study.summarize([0.9, 0.9, 0.9])},
        "stalled_from_step": {"0.001": [None, 120, None], "0.003": [117, 117, 234]},
    }}
    lines = [line for line in study.findings(results) if "stopped learning" in line]
    assert lines == [base_line, (
        "sigmoid + MSE at lr 0.003: 3 of 3 seeds stopped learning (gradient norm below 1e-06 of its first value, "
        f"for good: dead ReLUs or saturated outputs): seed {mse['seeds'][0]} by step 117, seed {mse['seeds'][1]} "
        f"by step 117, seed {mse['seeds'][2]} by step 234."
    )]
