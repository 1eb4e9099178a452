"""The benchmark tools: bench.py's JSON, and the peer harness (experiments/peers.py).

Speed is never asserted (timings are noisy); these tests check that the commands run,
report what the issue asks for, and that an unavailable peer is skipped with its reason.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "experiments"))

import peers  # noqa: E402  (experiments/peers.py)


def _child_env() -> dict[str, str]:
    env = dict(os.environ)
    env["XLA_FLAGS"] = " ".join(f for f in env.get("XLA_FLAGS", "").split() if "device_count" not in f)
    return env


def test_unknown_peer_is_a_clear_error():
    with pytest.raises(ValueError, match="unknown peer 'nope'.*keras"):
        peers.build("nope", 8)


@pytest.mark.slow
def test_peer_harness_times_keras_and_skips_what_cannot_start():
    rounds = iter([100.0, 300.0])
    results = peers.compare_with_peers(lambda: next(rounds), ["keras", "nope"], batch_size=8, steps=1, rounds=2,
                                       pause=0.0)
    assert results["softsig"]["images_per_second_per_round"] == [100.0, 300.0]
    assert results["softsig"]["softsig_speed_ratio_median"] == 1.0
    keras = results["keras"]
    assert len(keras["images_per_second_per_round"]) == 2 and all(v > 0 for v in keras["images_per_second_per_round"])
    ratios = sorted(s / k for s, k in zip([100.0, 300.0], keras["images_per_second_per_round"]))
    assert keras["softsig_speed_ratio_median"] == pytest.approx(sum(ratios) / 2)  # within-round ratios
    assert "unknown peer 'nope'" in results["nope"]["skipped"]
    table = peers.format_peer_table(results, 8)
    assert "| keras |" in table and "skipped" in table


@pytest.mark.slow
def test_bench_writes_the_numbers_issue_6_asks_for(tmp_path):
    output = tmp_path / "bench.json"
    process = subprocess.run(
        [sys.executable, str(ROOT / "experiments" / "bench.py"), "--steps=2", "--repeats=1", "--num_examples=512",
         "--conv_blocks=8;16", "--dense_features=32", "--batch_size=64", "--weight_grad_chunk=16",
         f"--output={output}"],
        capture_output=True, text=True, env=_child_env(), timeout=600,
    )
    assert process.returncode == 0, process.stderr[-3000:]
    results = json.loads(output.read_text())
    for name in ("train_images_per_second", "eval_images_per_second", "input_pipeline_images_per_second",
                 "achieved_gflops", "matmul_peak_gflops", "fraction_of_matmul_peak", "first_step_seconds",
                 "time_to_first_step_seconds", "epoch_seconds"):
        assert results[name] > 0, name
    assert results["batch_size"] == 64 and results["weight_grad_chunk"] == 16
    assert results["time_to_first_step_seconds"] > results["first_step_seconds"]
    assert "train_images_per_second" in process.stdout
