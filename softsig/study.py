"""The sigmoid-MSE vs softmax-CE study: seeds x losses, statistics, plots and report.md.

Each loss trains ``num_seeds`` seeds, with the full checkpoint/resume behaviour of a single
run, so an interrupted comparison resumes where it stopped. On GPU/TPU the seeds are one
vmapped program (``Config.num_seeds``) in ``workdir/<loss>``; on CPU, where a vmapped
program of 3 seeds trains ~35% fewer images/s than one seed alone (BUILD_NOTES.md), they are separate runs in
``workdir/<loss>/seed_<s>`` by default (``vmap_seeds`` chooses). Both give the same per-seed
results (tested). Seeds are paired across losses: seed
``s`` has the same initial parameters and data order under both heads, so the
per-seed difference of final test errors is a paired sample.

``results.json`` holds everything the report needs; ``write_report`` is a pure function
of it, so ``--report_only`` regenerates identical plots and text.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from collections.abc import Sequence
from typing import Any

import numpy as np

from softsig.config import Config, ConfigError
from softsig.losses import LOSS_NAMES
from softsig.metrics import is_scalar_metric, read_metrics

RESULTS_FILE = "results.json"
REPORT_FILE = "report.md"
PER_EPOCH_METRICS = ("train_loss", "train_accuracy", "test_loss", "test_accuracy", "test_error_rate")
DIAGNOSTICS = {  # per-epoch eval fields (absent in runs made before they existed)
    "test_ece": "expected calibration error (15 bins; sigmoid outputs normalised to sum to 1)",
    "test_saturated_fraction": "fraction of outputs with p < 0.01 or p > 0.99",
    "test_true_class_p1mp": "mean p(1-p) on the true class",
}
SEED_MODES = {"vmapped": "vmapped", "sequential": "one run per seed"}
LABELS = {"sigmoid_mse": "sigmoid + MSE", "softmax_cross_entropy": "softmax + CE"}
COLORS = {"sigmoid_mse": "tab:orange", "softmax_cross_entropy": "tab:blue"}

# Two-sided 95% Student-t quantiles t_{0.975, df} for df = 1..30 (standard tables).
_T975 = (
    12.7062, 4.3027, 3.1824, 2.7764, 2.5706, 2.4469, 2.3646, 2.3060, 2.2622, 2.2281,
    2.2010, 2.1788, 2.1604, 2.1448, 2.1314, 2.1199, 2.1098, 2.1009, 2.0930, 2.0860,
    2.0796, 2.0739, 2.0687, 2.0639, 2.0595, 2.0555, 2.0518, 2.0484, 2.0452, 2.0423,
)


def t_quantile_975(df: int) -> float:
    """t_{0.975} with ``df`` degrees of freedom (table up to 30, Cornish-Fisher beyond)."""
    if df < 1:
        raise ValueError(f"degrees of freedom must be >= 1, got {df}")
    if df <= len(_T975):
        return _T975[df - 1]
    z = 1.959963984540054
    return z + (z**3 + z) / (4 * df) + (5 * z**5 + 16 * z**3 + 3 * z) / (96 * df**2)


def summarize(values: Sequence[float]) -> dict[str, Any]:
    """Mean, sample std (ddof=1) and the 95% t confidence interval of the mean."""
    x = np.asarray(values, np.float64)
    n = len(x)
    mean = float(np.mean(x))
    if n < 2:
        return {"n": n, "mean": mean, "std": float("nan"), "ci95": [float("nan"), float("nan")]}
    std = float(np.std(x, ddof=1))
    half = t_quantile_975(n - 1) * std / math.sqrt(n)
    return {"n": n, "mean": mean, "std": std, "ci95": [mean - half, mean + half]}


def study_config(base: Config, loss: str, num_seeds: int, learning_rate: float | None = None) -> Config:
    return dataclasses.replace(base, loss=loss, num_seeds=num_seeds,
                               learning_rate=base.learning_rate if learning_rate is None else learning_rate)


def sweep_dir(workdir: str, loss: str, learning_rate: float) -> str:
    """Where a swept run lives; the base learning rate's run is ``workdir/<loss>`` itself."""
    return os.path.join(workdir, f"{loss}_lr{learning_rate:g}")


def check_losses(losses: Sequence[str]) -> tuple[str, ...]:
    losses = tuple(losses)
    unknown = [name for name in losses if name not in LOSS_NAMES]
    if not losses or unknown:
        raise ConfigError(f"--losses={','.join(losses)!r}: valid losses are {', '.join(LOSS_NAMES)}.")
    return losses


def check_learning_rates(learning_rates: Sequence[float], base: float) -> tuple[float, ...]:
    rates = tuple(float(x) for x in learning_rates)
    if any(not rate > 0 for rate in rates):
        raise ConfigError(f"--lr_sweep={','.join(map(str, rates))!r}: learning rates must be positive.")
    return tuple(sorted(set(rates) - {base}))


def seed_dir(run_dir: str, seed: int) -> str:
    """Where seed ``seed`` of a run lives when seeds are trained one after another."""
    return os.path.join(run_dir, f"seed_{seed}")


def _seed_dirs(run_dir: str) -> list[str]:
    names = os.listdir(run_dir) if os.path.isdir(run_dir) else []
    seeds = sorted(int(name[len("seed_"):]) for name in names if name.startswith("seed_") and name[5:].isdigit())
    return [seed_dir(run_dir, seed) for seed in seeds]


def resolve_vmap_seeds(vmap_seeds: bool | None) -> bool:
    """None: vmapped on GPU/TPU, one run per seed on CPU."""
    if vmap_seeds is not None:
        return vmap_seeds
    import jax

    return jax.default_backend() != "cpu"


def check_seed_layout(run_dir: str, vmap_seeds: bool) -> None:
    """A resumed study must keep the seed layout it started with."""
    if vmap_seeds and _seed_dirs(run_dir):
        raise ConfigError(f"{run_dir} holds one run per seed (started with --vmap_seeds=false); "
                          "resume with --vmap_seeds=false or use a new --workdir.")
    if not vmap_seeds and os.path.exists(os.path.join(run_dir, "config.json")):
        raise ConfigError(f"{run_dir} holds vmapped seeds (started with --vmap_seeds=true); "
                          "resume with --vmap_seeds=true or use a new --workdir.")


def run_study(
    base: Config,
    workdir: str,
    losses: Sequence[str],
    num_seeds: int,
    show_progress: bool = True,
    lr_sweep: Sequence[float] = (),
    vmap_seeds: bool | None = None,
) -> dict:
    """Trains every loss at the base learning rate and at each ``lr_sweep`` rate (seeds vmapped,
    or one run per seed: ``resolve_vmap_seeds``), then writes results.json, the plots and report.md."""
    from softsig.run import train_and_evaluate  # the study is the only caller that trains

    losses = check_losses(losses)
    if num_seeds < 1:
        raise ConfigError(f"--num_seeds={num_seeds} must be positive.")
    vmap_seeds = resolve_vmap_seeds(vmap_seeds) or num_seeds == 1
    extra_rates = check_learning_rates(lr_sweep, base.learning_rate)
    runs = [(loss, None, os.path.join(workdir, loss)) for loss in losses]
    runs += [(loss, rate, sweep_dir(workdir, loss, rate)) for loss in losses for rate in extra_rates]
    for loss, rate, run_dir in runs:
        study_config(base, loss, num_seeds, rate).validate()  # every bad flag before the first run
        check_seed_layout(run_dir, vmap_seeds)
    for loss, rate, run_dir in runs:
        config = study_config(base, loss, num_seeds, rate)
        if vmap_seeds:
            train_and_evaluate(config, run_dir, show_progress=show_progress)
            continue
        for seed in range(base.seed, base.seed + num_seeds):
            single = dataclasses.replace(config, seed=seed, num_seeds=1)
            train_and_evaluate(single, seed_dir(run_dir, seed), show_progress=show_progress)
    results = collect_results(workdir, losses, extra_rates)
    write_results(results, workdir)
    write_report(results, workdir)
    return results


def load_run(run_dir: str) -> tuple[dict, list[dict]]:
    """``(config.json, metrics records)`` of a study run in either seed layout.

    One run per seed is merged into the vmapped form: per-seed fields become lists in seed
    order; ``step``, ``epoch`` and ``config.json`` come from the first seed.
    """
    config_path = os.path.join(run_dir, "config.json")
    if os.path.exists(config_path):
        with open(config_path) as f:
            return json.load(f), read_metrics(run_dir)
    dirs = _seed_dirs(run_dir)
    if not dirs:
        raise RuntimeError(f"{run_dir} has no runs yet; train it first.")
    with open(os.path.join(dirs[0], "config.json")) as f:
        described = json.load(f)
    described["config"] = {**described["config"], "num_seeds": len(dirs), "seed_mode": "sequential"}
    per_seed = [read_metrics(d) for d in dirs]
    records = []
    for group in zip(*per_seed):  # records a seed has not written yet are left out
        merged = dict(group[0])
        for name, value in group[0].items():
            if is_scalar_metric(name, value):
                merged[name] = [record.get(name) for record in group]
        records.append(merged)
    return described, records


def _train_records(records: Sequence[dict]) -> list[dict]:
    return [r for r in records if "train_loss" in r and "test_loss" not in r]


def _per_seed(value: Any) -> list[float]:
    return [float(v) for v in value] if isinstance(value, list) else [float(value)]


def _final_errors_and_stalls(run_dir: str) -> tuple[list[float], list[int | None]]:
    """A finished run's final test error and ``stalled_from_steps``, per seed."""
    records = load_run(run_dir)[1]
    final_eval = [r for r in records if "test_loss" in r][-1]
    return [float(v) for v in _per_seed(final_eval["test_error_rate"])], stalled_from_steps(_train_records(records))


STALL_RATIO = 1e-6


def stalled_from_steps(train_records: Sequence[dict]) -> list[int | None]:
    """Per seed: the step by which the global gradient norm fell below ``STALL_RATIO`` x its first
    value and stayed there to the end, or None. Such a run has stopped learning for good (dead
    ReLUs or saturated outputs), so its final error says nothing about the head's best."""
    if not train_records or "grad_norm" not in train_records[0]:
        return []
    norms_SD = np.asarray([_per_seed(r["grad_norm"]) for r in train_records], np.float64).T
    steps = [r["step"] for r in train_records]
    stalled: list[int | None] = []
    for norms in norms_SD:
        low = norms < STALL_RATIO * norms[0]
        start = len(low)  # the trailing run of low norms begins at records[start]
        while start > 0 and low[start - 1]:
            start -= 1
        stalled.append(int(steps[start]) if start < len(low) else None)
    return stalled


def collect_results(workdir: str, losses: Sequence[str], extra_rates: Sequence[float] = ()) -> dict[str, Any]:
    """results.json's content, from each run's config.json and metrics.jsonl."""
    per_loss: dict[str, Any] = {}
    setup: dict[str, Any] = {}
    for loss in losses:
        run_dir = os.path.join(workdir, loss)
        described, all_records = load_run(run_dir)
        records = [r for r in all_records if "test_loss" in r]
        if not records:
            raise RuntimeError(f"{run_dir} has no evaluation records yet; train it first.")
        config = described["config"]
        seeds = list(range(config["seed"], config["seed"] + config.get("num_seeds", 1)))
        names = PER_EPOCH_METRICS + tuple(name for name in DIAGNOSTICS if all(name in r for r in records))
        per_seed = {name: np.asarray([_per_seed(r[name]) for r in records]).T.tolist() for name in names}
        train_records = _train_records(all_records)
        layers = sorted(k[len("grad_norm_"):] for k in train_records[0] if k.startswith("grad_norm_")) if train_records else []
        final_errors = [row[-1] for row in per_seed["test_error_rate"]]
        per_loss[loss] = {
            "seeds": seeds,
            "epochs": [r["epoch"] for r in records],
            "per_seed": per_seed,
            "final_test_error": summarize(final_errors),
            "final_test_loss": summarize([row[-1] for row in per_seed["test_loss"]]),
            "learning_rate": config["learning_rate"],
            "stalled_from_step": stalled_from_steps(train_records),
            "grad_norms": {  # per layer, per dispatch, mean over seeds
                "steps": [r["step"] for r in train_records] if layers else [],
                "layers": {layer: [float(np.mean(_per_seed(r[f"grad_norm_{layer}"]))) for r in train_records]
                           for layer in layers},
            },
        }
        if not setup:
            setup = {
                "dataset": described["dataset"],
                "model": {"conv_blocks": config["conv_blocks"], "dense_features": config["dense_features"],
                          "dropout_rate": config["dropout_rate"], "compute_dtype": config["compute_dtype"]},
                "training": {name: config[name] for name in (
                    "optimizer", "learning_rate", "momentum", "batch_size", "epochs", "augment",
                    "train_split", "test_split", "parallel")},
                "seed_mode": config.get("seed_mode", "vmapped"),
                "devices": described["devices"],
                "versions": described["versions"],
            }
    results: dict[str, Any] = {"setup": setup, "losses": per_loss}
    if extra_rates:
        sweep = {}
        for loss in per_loss:
            base = per_loss[loss]  # already read
            rates = {base["learning_rate"]: ([row[-1] for row in base["per_seed"]["test_error_rate"]],
                                             base["stalled_from_step"])}
            rates.update({rate: _final_errors_and_stalls(sweep_dir(workdir, loss, rate)) for rate in extra_rates})
            best = min(rates, key=lambda rate: np.mean(rates[rate][0]))
            sweep[loss] = {"learning_rates": sorted(rates), "final_test_error": {
                f"{rate:g}": summarize(rates[rate][0]) for rate in sorted(rates)}, "best_learning_rate": best,
                "best_final_errors": rates[best][0],
                "stalled_from_step": {f"{rate:g}": rates[rate][1] for rate in sorted(rates)}}
        results["lr_sweep"] = sweep
        if len(sweep) == 2:
            first, second = list(sweep)
            diffs = [a - b for a, b in zip(sweep[first]["best_final_errors"], sweep[second]["best_final_errors"])]
            results["lr_sweep_paired_difference"] = {"minuend": first, "subtrahend": second,
                                                     "final_test_error": summarize(diffs)}
    if len(per_loss) == 2:
        first, second = list(per_loss)
        a, b = per_loss[first], per_loss[second]
        if a["seeds"] == b["seeds"]:
            diffs = [x[-1] - y[-1] for x, y in zip(a["per_seed"]["test_error_rate"], b["per_seed"]["test_error_rate"])]
            results["paired_difference"] = {"minuend": first, "subtrahend": second, "final_test_error": summarize(diffs)}
    return results


def write_results(results: dict, workdir: str) -> str:
    path = os.path.join(workdir, RESULTS_FILE)
    with open(path + ".tmp", "w") as f:
        json.dump(results, f, indent=2, sort_keys=True)
    os.replace(path + ".tmp", path)
    return path


def load_results(workdir: str) -> dict:
    path = os.path.join(workdir, RESULTS_FILE)
    if not os.path.exists(path):
        raise ConfigError(f"--report_only: {path} does not exist; run the comparison first.")
    with open(path) as f:
        return json.load(f)


# -- plots --------------------------------------------------------------------------------


def _band(ax, epochs, rows, loss, label):
    rows = np.asarray(rows)
    mean = rows.mean(0)
    ax.plot(epochs, mean, color=COLORS.get(loss), label=label, marker="o", markersize=3)
    if len(rows) > 1:
        ax.fill_between(epochs, rows.min(0), rows.max(0), color=COLORS.get(loss), alpha=0.2)


def write_plots(results: dict, workdir: str) -> dict[str, str]:
    """PNG plots (deterministic given results.json): loss curves, test error, final error with CIs."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    plt.rcParams["svg.hashsalt"] = "softsig"
    losses = results["losses"]
    paths = {}

    fig, axes = plt.subplots(1, len(losses), figsize=(5.5 * len(losses), 4), squeeze=False)
    for ax, (loss, r) in zip(axes[0], losses.items()):
        _band(ax, r["epochs"], r["per_seed"]["train_loss"], loss, "train")
        rows = np.asarray(r["per_seed"]["test_loss"])
        ax.plot(r["epochs"], rows.mean(0), color=COLORS.get(loss), linestyle="--", label="test", marker="s", markersize=3)
        if len(rows) > 1:
            ax.fill_between(r["epochs"], rows.min(0), rows.max(0), color=COLORS.get(loss), alpha=0.1)
        ax.set_title(f"{LABELS.get(loss, loss)}: loss (own scale)")
        ax.set_xlabel("epoch")
        ax.set_ylabel("MSE of sigmoid outputs" if loss == "sigmoid_mse" else "cross-entropy (nats)")
        ax.grid(alpha=0.3)
        ax.legend()
    fig.suptitle("Loss per epoch: mean over seeds, band = min..max (the two losses live on different scales)")
    fig.tight_layout()
    paths["loss_curves"] = _save(fig, workdir, "loss_curves.png")

    fig, ax = plt.subplots(figsize=(6.5, 4))
    for loss, r in losses.items():
        _band(ax, r["epochs"], np.asarray(r["per_seed"]["test_error_rate"]) * 100, loss, LABELS.get(loss, loss))
    ax.set_xlabel("epoch")
    ax.set_ylabel("test error rate (%)")
    ax.set_title("Test error per epoch (mean over seeds, band = min..max)")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    paths["test_error"] = _save(fig, workdir, "test_error.png")

    fig, ax = plt.subplots(figsize=(5, 4))
    for index, (loss, r) in enumerate(losses.items()):
        summary = r["final_test_error"]
        finals = [row[-1] * 100 for row in r["per_seed"]["test_error_rate"]]
        ax.scatter([index] * len(finals), finals, color=COLORS.get(loss), alpha=0.5, zorder=2)
        if summary["n"] > 1:
            low, high = (v * 100 for v in summary["ci95"])
            ax.errorbar(index + 0.15, summary["mean"] * 100, yerr=[[summary["mean"] * 100 - low], [high - summary["mean"] * 100]],
                        fmt="D", color="black", capsize=6, zorder=3)
        else:
            ax.scatter([index + 0.15], [summary["mean"] * 100], marker="D", color="black", zorder=3)
    ax.set_xticks(range(len(losses)), [LABELS.get(loss, loss) for loss in losses])
    ax.set_xlim(-0.6, len(losses) - 0.4)
    ax.set_ylabel("final test error rate (%)")
    ax.set_title("Final test error: seeds (dots), mean and 95% CI")
    ax.grid(alpha=0.3, axis="y")
    fig.tight_layout()
    paths["final_test_error"] = _save(fig, workdir, "final_test_error.png")
    if all(r.get("grad_norms", {}).get("layers") for r in losses.values()):
        fig, axes = plt.subplots(1, len(losses), figsize=(5.5 * len(losses), 4), squeeze=False, sharey=True)
        for ax, (loss, r) in zip(axes[0], losses.items()):
            for layer, norms in r["grad_norms"]["layers"].items():
                ax.plot(r["grad_norms"]["steps"], norms, label=layer)
            ax.set_yscale("log")
            ax.set_title(f"{LABELS.get(loss, loss)}: gradient norm per layer")
            ax.set_xlabel("step")
            ax.grid(alpha=0.3)
            ax.legend(fontsize=8)
        axes[0][0].set_ylabel("||grad|| (mean over seeds, per dispatch)")
        fig.tight_layout()
        paths["grad_norms"] = _save(fig, workdir, "grad_norms.png")
    plt.close("all")
    return paths


def _save(fig, workdir, name):
    path = os.path.join(workdir, name)
    fig.savefig(path, dpi=110, metadata={"Software": None})
    return name


# -- report -------------------------------------------------------------------------------


def _pct(x: float) -> str:
    return f"{100 * x:.2f}%"


def findings(results: dict) -> list[str]:
    """Short findings computed from the numbers."""
    losses = results["losses"]
    lines = []
    ranked = sorted(losses, key=lambda loss: losses[loss]["final_test_error"]["mean"])
    if len(ranked) >= 2:
        best, worst = ranked[0], ranked[-1]
        gap = losses[worst]["final_test_error"]["mean"] - losses[best]["final_test_error"]["mean"]
        lines.append(
            f"{LABELS.get(best, best)} has the lower mean final test error: "
            f"{_pct(losses[best]['final_test_error']['mean'])} vs {_pct(losses[worst]['final_test_error']['mean'])} "
            f"for {LABELS.get(worst, worst)} ({100 * gap:.2f} percentage points)."
        )
    paired = results.get("paired_difference")
    if paired:
        summary = paired["final_test_error"]
        name = f"{LABELS.get(paired['minuend'])} minus {LABELS.get(paired['subtrahend'])}"
        if summary["n"] > 1:
            low, high = summary["ci95"]
            excludes = low > 0 or high < 0
            lines.append(
                f"Paired by seed ({summary['n']} seeds), final test error of {name}: "
                f"{100 * summary['mean']:+.2f} pp, 95% CI [{100 * low:+.2f}, {100 * high:+.2f}] pp; the interval "
                + ("excludes zero: the difference is statistically clear at this sample size."
                   if excludes else "includes zero: this run cannot tell the heads apart.")
            )
        else:
            lines.append(f"Only one seed: no confidence interval for the difference ({100 * summary['mean']:+.2f} pp).")
    sweep = results.get("lr_sweep")
    if sweep:
        best = ", ".join(f"{LABELS.get(loss, loss)} at lr {s['best_learning_rate']:g} "
                         f"({_pct(np.mean(s['best_final_errors']))})" for loss, s in sweep.items())
        lines.append(f"Each head at its best learning rate of the sweep: {best}.")
        paired_best = results.get("lr_sweep_paired_difference")
        if paired_best and paired_best["final_test_error"]["n"] > 1:
            summary = paired_best["final_test_error"]
            low, high = summary["ci95"]
            lines.append(
                f"At the best learning rates, paired difference ({LABELS.get(paired_best['minuend'])} minus "
                f"{LABELS.get(paired_best['subtrahend'])}): {100 * summary['mean']:+.2f} pp, 95% CI "
                f"[{100 * low:+.2f}, {100 * high:+.2f}] pp ("
                + ("excludes zero)." if low > 0 or high < 0 else "includes zero).")
            )
    for loss, r in losses.items():
        errors = [row[-1] for row in r["per_seed"]["test_error_rate"]]
        line = _stall_finding(LABELS.get(loss, loss), r["seeds"], r.get("stalled_from_step", []), errors)
        if line:
            lines.append(line + " The mean final error above includes them.")
    for loss, s in (sweep or {}).items():
        for rate, stalled in s.get("stalled_from_step", {}).items():
            line = _stall_finding(f"{LABELS.get(loss, loss)} at lr {rate}", losses[loss]["seeds"], stalled)
            if line and float(rate) != losses[loss]["learning_rate"]:  # the base rate's line is above
                lines.append(line)
    for loss, r in losses.items():
        first = np.mean([row[0] for row in r["per_seed"]["train_loss"]])
        last = np.mean([row[-1] for row in r["per_seed"]["test_loss"]])
        lines.append(
            f"{LABELS.get(loss, loss)} loss scale: mean train loss {first:.4f} over the first epoch, "
            f"final test loss {last:.4f}."
        )
    if len(losses) == 2 and all(loss in losses for loss in LOSS_NAMES):
        mse = np.mean([row[-1] for row in losses["sigmoid_mse"]["per_seed"]["test_loss"]])
        ce = np.mean([row[-1] for row in losses["softmax_cross_entropy"]["per_seed"]["test_loss"]])
        lines.append(f"The final test losses differ in scale by {ce / mse:.1f}x (CE / MSE): compare them on separate axes.")
    return lines


def _stall_finding(label: str, seeds: Sequence[int], stalled_steps: Sequence[int | None],
                   final_errors: Sequence[float] | None = None) -> str | None:
    stalled = [(i, seed, step) for i, (seed, step) in enumerate(zip(seeds, stalled_steps)) if step is not None]
    if not stalled:
        return None
    return (
        f"{label}: {len(stalled)} of {len(seeds)} seeds stopped learning (gradient norm below {STALL_RATIO:g} of its "
        "first value, for good: dead ReLUs or saturated outputs): "
        + ", ".join(f"seed {seed} by step {step}" + (f" (final test error {_pct(final_errors[i])})" if final_errors else "")
                    for i, seed, step in stalled) + "."
    )


def render_report(results: dict, plot_names: dict[str, str]) -> str:
    """report.md as text: a pure function of results.json."""
    setup = results["setup"]
    dataset = setup["dataset"]
    training = setup["training"]
    model = setup["model"]
    losses = results["losses"]
    seeds = next(iter(losses.values()))["seeds"]
    data_name = dataset["name"] + (" (SYNTHETIC DATA, not CIFAR-10)" if dataset.get("synthetic") else "")
    lines = [
        "# sigmoid + MSE vs softmax + CE",
        "",
        "Generated by `experiments/compare.py` from `results.json`; rerun with `--report_only` to regenerate.",
        "",
        "## Setup",
        "",
        f"- Dataset: {data_name}, {dataset['num_classes']} classes, images {tuple(dataset['image_shape'])}; "
        f"train split `{training['train_split']}`, test split `{training['test_split']}`.",
        f"- Model: CNN conv blocks `{model['conv_blocks']}`, dense `{model['dense_features']}`, ReLU, 2x2 max pooling, "
        f"dropout {model['dropout_rate']}, compute {model['compute_dtype']}.",
        f"- Training: {training['optimizer']} (lr {training['learning_rate']}"
        + (f", momentum {training['momentum']}" if training["optimizer"] == "sgd" else "")
        + f"), batch {training['batch_size']}, {training['epochs']} epochs, augmentation "
        f"{'on' if training['augment'] else 'off'}; seeds {seeds} ({SEED_MODES[setup.get('seed_mode', 'vmapped')]}; "
        "paired across heads: same init and data order).",
        f"- Hardware: {setup['devices']['used']} {setup['devices']['platform']} device(s) "
        f"({', '.join(setup['devices']['kinds'])}), {training['parallel']}; "
        + ", ".join(f"{k} {v}" for k, v in sorted(setup["versions"].items()) if v),
        "",
        "## Final test error",
        "",
        "| head | seeds | mean | std | 95% CI | final test loss (mean) |",
        "|---|---|---|---|---|---|",
    ]
    for loss, r in losses.items():
        s = r["final_test_error"]
        ci = "n/a" if s["n"] < 2 else f"[{_pct(s['ci95'][0])}, {_pct(s['ci95'][1])}]"
        std = "n/a" if s["n"] < 2 else _pct(s["std"])
        lines.append(
            f"| {LABELS.get(loss, loss)} | {s['n']} | {_pct(s['mean'])} | {std} | {ci} | {r['final_test_loss']['mean']:.4f} |"
        )
    diagnostics = [name for name in DIAGNOSTICS if all(name in r["per_seed"] for r in losses.values())]
    if diagnostics:
        lines += ["", "## Diagnostics on the test set after the last epoch (mean over seeds)", "",
                  "| head | " + " | ".join(DIAGNOSTICS[name] for name in diagnostics) + " |",
                  "|---|" + "---|" * len(diagnostics)]
        for loss, r in losses.items():
            cells = [f"{np.mean([row[-1] for row in r['per_seed'][name]]):.4f}" for name in diagnostics]
            lines.append(f"| {LABELS.get(loss, loss)} | " + " | ".join(cells) + " |")
    if results.get("lr_sweep"):
        sweep = results["lr_sweep"]
        rates = sorted({rate for s in sweep.values() for rate in s["learning_rates"]})
        lines += ["", "## Learning-rate sweep: final test error (mean over seeds)", "",
                  "| head | " + " | ".join(f"lr {rate:g}" for rate in rates) + " | best |", "|---|" + "---|" * (len(rates) + 1)]
        for loss, s in sweep.items():
            cells = [_pct(s["final_test_error"][f"{rate:g}"]["mean"]) if f"{rate:g}" in s["final_test_error"] else "-"
                     for rate in rates]
            lines.append(f"| {LABELS.get(loss, loss)} | " + " | ".join(cells) + f" | {s['best_learning_rate']:g} |")
    lines += ["", "## Findings", ""] + [f"- {line}" for line in findings(results)]
    lines += ["", "## Plots", ""]
    titles = {"loss_curves": "Loss curves", "test_error": "Test error per epoch", "final_test_error": "Final test error",
              "grad_norms": "Gradient norm per layer"}
    for key, name in plot_names.items():
        lines += [f"![{titles.get(key, key)}]({name})", ""]
    lines += ["## Per-epoch test error (mean over seeds)", "", "| epoch | " + " | ".join(
        LABELS.get(loss, loss) for loss in losses) + " |", "|---|" + "---|" * len(losses)]
    epochs = next(iter(losses.values()))["epochs"]
    for index, epoch in enumerate(epochs):
        cells = [_pct(np.mean([row[index] for row in r["per_seed"]["test_error_rate"]])) for r in losses.values()]
        lines.append(f"| {epoch:g} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def write_report(results: dict, workdir: str) -> str:
    plot_names = write_plots(results, workdir)
    path = os.path.join(workdir, REPORT_FILE)
    with open(path, "w") as f:
        f.write(render_report(results, plot_names))
    return path
