"""End-to-end tests of ``python experiments/train.py`` run as a subprocess.

The runs are tiny (synthetic data, 512 training images, a 2-block CNN, 16 steps per
epoch); most of each subprocess's few seconds are imports and compilation. Every run
gets its own workdir. The uninterrupted 2-epoch run is made once per module (the
``reference`` fixture) and every resumed, preempted or multi-device run is compared with
it: train/eval metrics bit for bit (only wall-clock fields may differ), final
parameters bit for bit.

The children run on one CPU device unless a test asks for more with
``--jax_num_cpu_devices``: the 8 fake devices that conftest.py puts into XLA_FLAGS are
removed from the child environment. Set SOFTSIG_TEST_SEED to replay the random kill
moments of a failed run.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import json
import math
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import jax
import numpy as np
import pytest

from softsig import checkpoint as checkpoint_lib
from softsig import config as config_lib
from softsig import data as data_lib
from softsig import run as run_lib
from softsig import train as train_lib

REPO = Path(__file__).resolve().parents[1]
TRAIN_PY = REPO / "experiments" / "train.py"

# The fast settings of every run (typed like the Config fields they set).
FAST = {
    "dataset": "synthetic",
    "train_split": "train[:512]",
    "test_split": "test[:200]",
    "batch_size": 32,
    "eval_batch_size": 100,
    "epochs": 2,
    "conv_blocks": "8;16",
    "dense_features": "32",
    "steps_per_dispatch": 2,
    "checkpoint_every_steps": 4,
    "parallel": "none",
}
STEPS_PER_EPOCH = 512 // 32
TOTAL_STEPS = 2 * STEPS_PER_EPOCH
TIMING_FIELDS = {"images_per_second", "dispatch_seconds", "eval_seconds"}
TRAIN_FIELDS = {"step", "epoch", "train_loss", "train_accuracy", "grad_norm", "images_per_second", "dispatch_seconds"} | {
    f"grad_norm_{layer}" for layer in ("conv1_1", "conv2_1", "dense1", "head")  # --conv_blocks=8;16 --dense_features=32
}
EVAL_FIELDS = {
    "step", "epoch", "train_loss", "train_accuracy",
    "test_loss", "test_accuracy", "test_error_rate", "test_examples", "eval_seconds",
    "test_ece", "test_saturated_fraction", "test_true_class_p1mp",
}

RUN_TIMEOUT_S = 240  # per subprocess; a normal run takes 3-10 s
SEED = int(os.environ.get("SOFTSIG_TEST_SEED", time.time_ns() % 1_000_000))


# ----------------------------------------------------------------------------------------
# Running the CLI.


def child_env() -> dict[str, str]:
    env = dict(os.environ)
    env["TF_CPP_MIN_LOG_LEVEL"] = "2"
    xla_flags = [f for f in env.get("XLA_FLAGS", "").split() if not f.startswith("--xla_force_host_platform_device_count")]
    if xla_flags:
        env["XLA_FLAGS"] = " ".join(xla_flags)
    else:
        env.pop("XLA_FLAGS", None)
    return env


def cli_args(workdir, overrides=None, extra=()) -> list[str]:
    settings = {**FAST, **(overrides or {})}
    args = [sys.executable, str(TRAIN_PY), f"--workdir={workdir}"]
    args += [f"--{name}={value}" for name, value in settings.items() if value is not None]
    return args + list(extra)


def run_cli(workdir, overrides=None, extra=(), timeout=RUN_TIMEOUT_S) -> subprocess.CompletedProcess:
    return subprocess.run(
        cli_args(workdir, overrides, extra), cwd=REPO, env=child_env(), capture_output=True, text=True, timeout=timeout
    )


def describe(result) -> str:
    return f"exit code {result.returncode}\n--- stdout ---\n{result.stdout}\n--- stderr ---\n{result.stderr[-6000:]}"


class Background:
    """A CLI run in the background, stdout/stderr going to files (no pipe to fill up)."""

    def __init__(self, workdir: Path, logs: Path, overrides=None, extra=()):
        self.workdir = Path(workdir)
        logs.mkdir(parents=True, exist_ok=True)
        n = len(list(logs.glob("*.stderr")))
        self.out_path, self.err_path = logs / f"{n}.stdout", logs / f"{n}.stderr"
        with open(self.out_path, "w") as out, open(self.err_path, "w") as err:
            self.proc = subprocess.Popen(
                cli_args(workdir, overrides, extra), cwd=REPO, env=child_env(), stdout=out, stderr=err
            )
        self.started = time.monotonic()

    @property
    def stdout(self) -> str:
        return self.out_path.read_text(errors="replace")

    @property
    def stderr(self) -> str:
        return self.err_path.read_text(errors="replace")

    def wait_for_training(self, timeout=RUN_TIMEOUT_S) -> int | None:
        """Waits until this run trained at least one dispatch; its newest step, or None if it exited first.

        "Training ..." is printed after the restore and after metrics.jsonl was cut back to
        the restored step, so any record past the restored step is one this process wrote.
        """
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                return None
            err = self.stderr
            if "Training " in err:
                match = re.search(r"Resuming .* from step (\d+)", err)
                start = int(match.group(1)) if match else 0
                steps = [r["step"] for r in read_records_lenient(self.workdir)]
                if steps and max(steps) > start:
                    return max(steps)
            time.sleep(0.005)
        raise AssertionError(f"no training within {timeout} s\n{self.stderr[-4000:]}")

    def wait(self, timeout=RUN_TIMEOUT_S) -> int:
        return self.proc.wait(timeout=timeout)

    def kill(self):
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(timeout=60)


# ----------------------------------------------------------------------------------------
# Reading a workdir.


def read_records(workdir) -> list[dict]:
    with open(Path(workdir) / "metrics.jsonl") as f:
        return [json.loads(line) for line in f if line.strip()]


def read_records_lenient(workdir) -> list[dict]:
    """Records of a file another process is writing (a half-written last line is skipped)."""
    try:
        text = (Path(workdir) / "metrics.jsonl").read_text()
    except FileNotFoundError:
        return []
    records = []
    for line in text.splitlines():
        try:
            records.append(json.loads(line))
        except ValueError:
            pass
    return records


def without_timing(records: list[dict]) -> list[dict]:
    return [{k: v for k, v in r.items() if k not in TIMING_FIELDS} for r in records]


def eval_records(records):
    return [r for r in records if "test_loss" in r]


def checkpoint_steps(workdir, kind="latest") -> list[int]:
    directory = Path(workdir) / "checkpoints" / kind
    if not directory.is_dir():
        return []
    return sorted(int(p.name) for p in directory.iterdir() if p.is_dir() and p.name.isdigit())


def error_lines(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if line.startswith("error:")]


def tensorboard_scalars(workdir) -> dict[str, dict[int, float]]:
    """``{tag: {step: value}}`` from the event files under ``workdir/tensorboard``, read by TensorFlow."""
    tf = pytest.importorskip("tensorflow")
    from tensorflow.core.util import event_pb2

    scalars: dict[str, dict[int, float]] = {}
    for path in sorted((Path(workdir) / "tensorboard").rglob("events.out.tfevents.*")):
        for record in tf.data.TFRecordDataset(str(path)):
            event = event_pb2.Event.FromString(record.numpy())
            for value in event.summary.value:
                scalars.setdefault(value.tag, {})[event.step] = value.simple_value
    return scalars


@pytest.fixture(scope="module")
def abstract_state():
    """A fresh host train state with the shapes of the FAST model (what restore needs)."""
    return abstract_state_for(FAST)


def abstract_state_for(settings):
    config = config_lib.Config(**settings)
    model_config = run_lib.model_config_for(config, data_lib.dataset_info("synthetic"))
    tx = train_lib.make_optimizer(config.optimizer, config.learning_rate, config.momentum)
    _, state = train_lib.init_train_state(model_config, tx, config.seed)
    return jax.tree.map(np.asarray, state)._asdict()


def restore_latest(workdir, abstract_state):
    """``(step, state, meta)`` of the newest checkpoint that restores (via the product's Checkpointer)."""
    checkpointer = checkpoint_lib.Checkpointer(str(Path(workdir) / "checkpoints"))
    try:
        return checkpointer.restore_latest(abstract_state)
    finally:
        checkpointer.close()


def assert_same_state(a, b):
    (step_a, state_a, _), (step_b, state_b, _) = a, b
    assert step_a == step_b
    leaves_a, tree_a = jax.tree.flatten(state_a)
    leaves_b, tree_b = jax.tree.flatten(state_b)
    assert tree_a == tree_b
    for x, y in zip(leaves_a, leaves_b):
        assert x.dtype == y.dtype and x.shape == y.shape
        assert np.array_equal(x, y), "restored parameters/optimizer state differ"


def damage(step_dir: Path, how: str) -> None:
    state = step_dir / "state"
    assert state.is_dir(), f"no {state}"
    if how == "truncate_d":
        files = [p for p in (state / "d").iterdir() if p.is_file()]
        assert files
        for p in files:
            p.write_bytes(b"")
    elif how == "truncate_process_d":
        files = [p for p in state.glob("ocdbt.process_*/d/*") if p.is_file()]
        assert files
        for p in files:
            p.write_bytes(b"")
    elif how == "remove_manifest":
        (state / "manifest.ocdbt").unlink()
    elif how == "remove_metadata":
        (state / "_METADATA").unlink()
    elif how == "remove_state":
        shutil.rmtree(state)
    else:
        raise ValueError(how)


def copy_workdir(source, destination) -> Path:
    shutil.copytree(source, destination)
    return Path(destination)


# ----------------------------------------------------------------------------------------
# The uninterrupted reference run.


@dataclasses.dataclass
class Reference:
    workdir: Path
    result: subprocess.CompletedProcess
    records: list
    train_seconds: float  # from the first metrics record to the process exit


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> Reference:
    root = tmp_path_factory.mktemp("reference")
    workdir = root / "run"
    run = Background(workdir, root / "logs")
    try:
        first = run.wait_for_training()
        seen = time.monotonic()
        code = run.wait()
        train_seconds = time.monotonic() - seen
    finally:
        run.kill()
    result = subprocess.CompletedProcess(run.proc.args, code, run.stdout, run.stderr)
    assert first is not None and code == 0, describe(result)
    return Reference(workdir, result, read_records(workdir), train_seconds)


@pytest.fixture(scope="module")
def reference_state(reference, abstract_state):
    return restore_latest(reference.workdir, abstract_state)


# ----------------------------------------------------------------------------------------
# What a finished run leaves behind.


@pytest.mark.slow
def test_run_writes_metrics_config_tensorboard_checkpoints_and_final_line(reference, reference_state):
    result, workdir, records = reference.result, reference.workdir, reference.records
    assert "Traceback" not in result.stderr

    # metrics.jsonl: a train record per dispatch, an eval record per epoch.
    train_records = [r for r in records if "test_loss" not in r]
    evals = eval_records(records)
    assert [r["step"] for r in train_records] == list(range(2, TOTAL_STEPS + 1, 2))
    assert [r["step"] for r in evals] == [STEPS_PER_EPOCH, TOTAL_STEPS]
    for r in train_records:
        assert set(r) == TRAIN_FIELDS, r
        assert r["epoch"] == r["step"] / STEPS_PER_EPOCH
        assert all(math.isfinite(v) for v in r.values())
        assert 0 <= r["train_accuracy"] <= 1 and r["grad_norm"] > 0 and r["images_per_second"] > 0
    for r in evals:
        assert set(r) == EVAL_FIELDS, r
        assert r["epoch"] == r["step"] / STEPS_PER_EPOCH
        assert r["test_examples"] == 200
        assert r["test_error_rate"] == pytest.approx(1 - r["test_accuracy"])
        assert round(r["test_accuracy"] * 200) == pytest.approx(r["test_accuracy"] * 200)
    # the per-epoch train averages are the means of that epoch's per-dispatch records (2 steps each)
    for r in evals:
        epoch = [t for t in train_records if r["step"] - STEPS_PER_EPOCH < t["step"] <= r["step"]]
        assert r["train_loss"] == pytest.approx(np.mean([t["train_loss"] for t in epoch]), rel=1e-12)
    # records are written in order, one eval after the train record of the same step
    assert [r["step"] for r in records] == sorted(r["step"] for r in records)

    # The final line on stdout.
    final = evals[-1]
    last_line = result.stdout.strip().splitlines()[-1]
    assert last_line.startswith("final:"), result.stdout
    assert f"test_loss {final['test_loss']:.4f}" in last_line
    assert f"test_accuracy {final['test_accuracy']:.4f}" in last_line
    assert f"test_error_rate {final['test_error_rate']:.4f}" in last_line
    assert f"(step {TOTAL_STEPS})" in last_line

    # config.json: every flag value, versions, devices.
    description = json.loads((workdir / "config.json").read_text())
    assert {"config", "versions", "devices"} <= set(description)
    assert description["config"] == config_lib.Config(**FAST).to_dict()
    assert description["versions"]["jax"] == jax.__version__
    assert description["devices"]["used"] == 1 and description["devices"]["platform"] == "cpu"

    # TensorBoard mirrors the scalars of metrics.jsonl.
    scalars = tensorboard_scalars(workdir)
    for name in ("train_loss", "grad_norm", "test_loss", "test_accuracy", "test_error_rate"):
        assert name in scalars, sorted(scalars)
    assert sorted(scalars["test_loss"]) == [STEPS_PER_EPOCH, TOTAL_STEPS]
    assert scalars["test_loss"][TOTAL_STEPS] == pytest.approx(final["test_loss"], rel=1e-6)
    assert len(scalars["grad_norm"]) == len(train_records)

    # Checkpoints: the newest --keep_checkpoints=3 steps, and the best step by test accuracy.
    assert checkpoint_steps(workdir, "latest") == [24, 28, 32]
    best_step = max(evals, key=lambda r: (r["test_accuracy"], -r["step"]))["step"]
    assert checkpoint_steps(workdir, "best") == [best_step]
    leftovers = [p for p in (workdir / "checkpoints").rglob("*") if "tmp" in p.name]
    assert not leftovers
    step, _, meta = reference_state
    assert step == TOTAL_STEPS
    assert without_timing([meta["last_eval"]]) == without_timing([final])


@pytest.mark.slow
def test_rerunning_a_finished_run_does_nothing(reference, tmp_path):
    workdir = copy_workdir(reference.workdir, tmp_path / "run")
    before = {p.relative_to(workdir): p.read_bytes() for p in workdir.rglob("*") if p.is_file() and p.name != "config.json"}
    result = run_cli(workdir)
    assert result.returncode == 0, describe(result)
    assert "already finished" in result.stderr
    assert "Training " not in result.stderr  # no training, nothing compiled
    assert result.stdout.strip().splitlines()[-1] == reference.result.stdout.strip().splitlines()[-1]
    after = {p.relative_to(workdir): p.read_bytes() for p in workdir.rglob("*") if p.is_file() and p.name != "config.json"}
    assert after.keys() == before.keys()  # no new checkpoint, no new TensorBoard file
    assert after[Path("metrics.jsonl")] == before[Path("metrics.jsonl")]


# ----------------------------------------------------------------------------------------
# Resuming: SIGKILL, SIGTERM, a damaged newest checkpoint.


@pytest.mark.slow
def test_sigkill_at_random_moments_then_rerun_matches_uninterrupted_run(
    reference, reference_state, abstract_state, tmp_path
):
    rng = random.Random(SEED)
    # Training after the first record takes only ~1-2 s here, so the random moment is drawn
    # from the part of it the reference run actually spent training.
    max_delay = max(0.05, min(2.0, 0.8 * reference.train_seconds))
    log = [f"SOFTSIG_TEST_SEED={SEED} max_delay={max_delay:.2f}"]
    workdir = None
    for attempt in range(4):  # retried only when the run finished before the kill landed
        workdir = tmp_path / f"run{attempt}"
        run = Background(workdir, tmp_path / "logs")
        try:
            step = run.wait_for_training()
            assert step is not None, describe(subprocess.CompletedProcess(run.proc.args, run.proc.returncode, run.stdout, run.stderr))
            delay = rng.uniform(0, max_delay)
            time.sleep(delay)
            run.proc.send_signal(signal.SIGKILL)
            code = run.wait()
        finally:
            run.kill()
        log.append(f"attempt {attempt}: first record at step {step}, kill after {delay:.3f} s, exit {code}, "
                   f"records up to step {max([r['step'] for r in read_records_lenient(workdir)] or [0])}, "
                   f"checkpoints {checkpoint_steps(workdir)}")
        if code == -signal.SIGKILL:
            break
        max_delay /= 3
    else:
        pytest.fail("the run always finished before the kill: " + "; ".join(log))

    # A second kill, during the resumed run, if it is still training by then.
    run = Background(workdir, tmp_path / "logs")
    try:
        step = run.wait_for_training()
        if step is not None:
            delay = rng.uniform(0, max_delay / 2)
            time.sleep(delay)
            run.proc.send_signal(signal.SIGKILL)
        code = run.wait()
    finally:
        run.kill()
    log.append(f"resumed run: trained to {step}, exit {code}, checkpoints {checkpoint_steps(workdir)}")

    result = run_cli(workdir)
    assert result.returncode == 0, "; ".join(log) + "\n" + describe(result)
    assert without_timing(read_records(workdir)) == without_timing(reference.records), "; ".join(log)
    assert result.stdout.strip().splitlines()[-1] == reference.result.stdout.strip().splitlines()[-1]
    assert_same_state(restore_latest(workdir, abstract_state), reference_state)
    assert checkpoint_steps(workdir, "latest") == checkpoint_steps(reference.workdir, "latest")
    print("; ".join(log))


@pytest.mark.slow
def test_sigterm_saves_exits_143_and_rerun_matches_uninterrupted_run(
    reference, reference_state, abstract_state, tmp_path
):
    for attempt in range(3):
        workdir = tmp_path / f"run{attempt}"
        run = Background(workdir, tmp_path / "logs")
        try:
            step = run.wait_for_training()
            assert step is not None, run.stderr
            sent = time.monotonic()
            run.proc.send_signal(signal.SIGTERM)
            code = run.wait(timeout=60)
            seconds = time.monotonic() - sent
        finally:
            run.kill()
        if code != 0:  # 0: the run finished before the signal arrived; try again
            break
    stderr = run.stderr
    assert code == run_lib.PREEMPTED_EXIT_CODE == 143, stderr
    assert seconds < 20, f"took {seconds:.1f} s to stop after SIGTERM"
    assert "Traceback" not in stderr
    match = re.search(r"preempted: saved a checkpoint at step (\d+)", stderr)
    assert match, stderr
    saved = int(match.group(1))
    assert 0 < saved <= TOTAL_STEPS
    assert max(checkpoint_steps(workdir)) == saved
    restored = restore_latest(workdir, abstract_state)
    assert restored is not None and restored[0] == saved
    records = read_records(workdir)
    assert max(r["step"] for r in records) == saved
    assert without_timing(records) == without_timing([r for r in reference.records if r["step"] <= saved])

    result = run_cli(workdir)
    assert result.returncode == 0, describe(result)
    if saved < TOTAL_STEPS:
        assert f"from step {saved}" in result.stderr
    assert without_timing(read_records(workdir)) == without_timing(reference.records)
    assert eval_records(read_records(workdir))[-1]["test_loss"] == eval_records(reference.records)[-1]["test_loss"]
    assert_same_state(restore_latest(workdir, abstract_state), reference_state)


@pytest.mark.slow
def test_damaged_newest_checkpoint_falls_back_and_a_longer_run_continues(
    reference, reference_state, abstract_state, tmp_path
):
    """A 1-epoch run, its newest checkpoint damaged, then the 2-epoch command in the same workdir."""
    workdir = tmp_path / "run"
    first = run_cli(workdir, {"epochs": 1})
    assert first.returncode == 0, describe(first)
    assert checkpoint_steps(workdir) == [8, 12, 16]
    assert without_timing(read_records(workdir)) == without_timing(
        [r for r in reference.records if r["step"] <= STEPS_PER_EPOCH]
    )
    damage(workdir / "checkpoints" / "latest" / "16", "truncate_d")

    result = run_cli(workdir, {"epochs": 2})
    assert result.returncode == 0, describe(result)
    warnings = [line for line in result.stderr.splitlines() if "damaged" in line]
    assert warnings and "step 16" in warnings[0], result.stderr
    assert "from step 12" in result.stderr
    records = read_records(workdir)
    assert without_timing(records) == without_timing(reference.records)
    assert eval_records(records)[-1]["test_loss"] == eval_records(reference.records)[-1]["test_loss"]
    assert_same_state(restore_latest(workdir, abstract_state), reference_state)


@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")  # orbax's asyncio noise
@pytest.mark.parametrize("how", ["truncate_d", "truncate_process_d", "remove_manifest", "remove_metadata", "remove_state"])
def test_restore_falls_back_past_each_kind_of_damage(reference, abstract_state, tmp_path, how, caplog):
    workdir = copy_workdir(reference.workdir, tmp_path / "run")
    damage(workdir / "checkpoints" / "latest" / "32", how)
    restored = restore_latest(workdir, abstract_state)
    assert restored is not None and restored[0] == 28
    assert "damaged" in caplog.text
    assert restored[2]["step"] == 28


@pytest.fixture(scope="module")
def damaged_final_rerun(reference, tmp_path_factory):
    """The finished reference run with its newest checkpoint damaged, rerun once."""
    workdir = copy_workdir(reference.workdir, tmp_path_factory.mktemp("damaged_final") / "run")
    damage(workdir / "checkpoints" / "latest" / str(TOTAL_STEPS), "remove_manifest")
    return workdir, run_cli(workdir)


@pytest.mark.slow
def test_damaged_final_checkpoint_is_retrained_from_the_previous_one(damaged_final_rerun, reference):
    workdir, result = damaged_final_rerun
    assert result.returncode == 0, describe(result)
    assert "damaged" in result.stderr and "from step 28" in result.stderr
    assert without_timing(read_records(workdir)) == without_timing(reference.records)


@pytest.mark.slow
@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")
def test_recovered_run_replaces_the_damaged_checkpoint(damaged_final_rerun, reference_state, abstract_state, caplog):
    workdir, result = damaged_final_rerun
    assert result.returncode == 0
    restored = restore_latest(workdir, abstract_state)
    assert restored is not None and restored[0] == TOTAL_STEPS, f"newest good checkpoint: step {restored and restored[0]}"
    assert "damaged" not in caplog.text
    assert_same_state(restored, reference_state)


# ----------------------------------------------------------------------------------------
# The best checkpoint across a restart.


@pytest.mark.slow
def test_best_checkpoint_survives_a_restart(tmp_path):
    # sgd at 0.3: test accuracy drops from epoch 1 to epoch 2 (0.125 -> 0.11), so epoch 1 is the best.
    settings = {"optimizer": "sgd", "learning_rate": 0.3}
    workdir = tmp_path / "run"
    first = run_cli(workdir, {**settings, "epochs": 1})
    assert first.returncode == 0, describe(first)
    assert checkpoint_steps(workdir, "best") == [STEPS_PER_EPOCH]
    second = run_cli(workdir, {**settings, "epochs": 2})
    assert second.returncode == 0, describe(second)
    evals = eval_records(read_records(workdir))
    if not evals[1]["test_accuracy"] < evals[0]["test_accuracy"]:
        pytest.skip(f"test accuracy no longer drops in epoch 2 ({evals}); the scenario needs a new setting")
    assert checkpoint_steps(workdir, "best") == [STEPS_PER_EPOCH]


# ----------------------------------------------------------------------------------------
# Bad input: one line on stderr naming the flag, exit code 1, before anything is compiled.


@dataclasses.dataclass(frozen=True)
class ErrorCase:
    overrides: dict
    extra: tuple = ()
    needles: tuple = ()  # all must appear in the error line(s)
    workdir: str = "fresh"  # fresh | reference_config | under_file
    one_line: bool = True
    workdir_created: bool = False  # False: the run failed in validate(), before it touched the workdir


EMPTY_DATA_DIR = "<EMPTY_DATA_DIR>"  # replaced by a fresh empty directory


# Each case costs a process start (~3 s of CPU); the rest of the validation is tested in-process
# below (--optimizer=rmsprop, --parallel=fsdp, --batch_size=0, --optimizer=sgd against an adam
# workdir, ...), through the same Config.validate / check_resumable the CLI calls.
ERROR_CASES = {
    "loss": ErrorCase({"loss": "hinge"}, needles=("--loss", "sigmoid_mse, softmax_cross_entropy")),
    "negative_learning_rate": ErrorCase({"learning_rate": -1}, needles=("--learning_rate",)),
    "data_not_prepared": ErrorCase(
        {"dataset": "cifar10", "data_dir": EMPTY_DATA_DIR},
        needles=("cifar10", EMPTY_DATA_DIR, "tfds build"), one_line=False, workdir_created=True,
    ),
    "unwritable_workdir": ErrorCase({}, needles=("--workdir", "not writable"), workdir="under_file"),
    "batch_not_divisible_by_devices": ErrorCase(
        {"batch_size": 30, "parallel": "shard_map"}, extra=("--jax_num_cpu_devices=4",),
        needles=("--batch_size=30", "number of devices (4)"), workdir_created=True,
    ),
    "shape_change_conv_blocks": ErrorCase(
        {"conv_blocks": "8;8"}, needles=("--conv_blocks", "8;16"), workdir="reference_config", workdir_created=True
    ),
    # Plain ValueErrors from deeper down, reported as one line naming the flag (run._flag_error).
    "unknown_dataset": ErrorCase({"dataset": "nosuchdataset"}, needles=("--dataset",), workdir_created=True),
    "num_devices_above_available": ErrorCase(
        {"parallel": "shard_map", "num_devices": 8}, extra=("--jax_num_cpu_devices=4",),
        needles=("--num_devices",), workdir_created=True,
    ),
    "unknown_split": ErrorCase({"train_split": "validation"}, needles=("--train_split",), workdir_created=True),
    "batch_larger_than_split": ErrorCase(
        {"train_split": "train[:10]"}, needles=("--batch_size=32", "exceeds"), workdir_created=True
    ),
    "too_many_pooling_stages": ErrorCase(
        {"conv_blocks": "8;8;8;8;8;8"}, needles=("--conv_blocks", "pooling"), workdir_created=True
    ),
}



@pytest.fixture(scope="module")
def cli_errors(reference, tmp_path_factory):
    """Every ERROR_CASES run, a few at a time (they are short and mostly imports)."""
    root = tmp_path_factory.mktemp("cli_errors")
    empty_data_dir = root / "empty_data_dir"
    empty_data_dir.mkdir()
    regular_file = root / "a_file"
    regular_file.write_text("not a directory")

    def prepare(name, case):
        if case.workdir == "under_file":
            workdir = regular_file / "sub"
        else:
            workdir = root / name
            if case.workdir == "reference_config":  # a run with checkpoints: it binds the shape flags
                workdir.mkdir()
                shutil.copy(reference.workdir / "config.json", workdir / "config.json")
                shutil.copytree(reference.workdir / "checkpoints", workdir / "checkpoints")
        overrides = {k: (str(empty_data_dir) if v == EMPTY_DATA_DIR else v) for k, v in case.overrides.items()}
        needles = tuple(str(empty_data_dir) if n == EMPTY_DATA_DIR else n for n in case.needles)
        return workdir, overrides, needles

    def launch(name):
        workdir, overrides, needles = prepare(name, ERROR_CASES[name])
        config_before = (workdir / "config.json").read_bytes() if (workdir / "config.json").is_file() else None
        start = time.monotonic()
        result = run_cli(workdir, overrides, ERROR_CASES[name].extra, timeout=120)
        return name, (workdir, needles, result, time.monotonic() - start, config_before)

    with concurrent.futures.ThreadPoolExecutor(max_workers=3) as pool:
        return dict(pool.map(launch, ERROR_CASES))


@pytest.mark.slow
@pytest.mark.parametrize(
    "name",
    list(ERROR_CASES),
)
def test_bad_input_fails_with_one_line_naming_the_flag(cli_errors, name):
    case = ERROR_CASES[name]
    workdir, needles, result, seconds, config_before = cli_errors[name]
    assert result.returncode == 1, describe(result)
    assert "Traceback" not in result.stderr, describe(result)
    lines = error_lines(result.stderr)
    assert len(lines) == 1, describe(result)
    if case.one_line:
        assert result.stderr.strip().splitlines() == lines, describe(result)
        message = lines[0]
    else:  # DataNotFoundError: the first line says what is missing, the next ones how to prepare it
        message = result.stderr[result.stderr.index("error:"):]
    for needle in needles:
        assert needle in message, describe(result)
    assert result.stdout.strip() == ""
    # Failed before training: nothing but (at most) the workdir itself was created, and an
    # existing run's config.json is untouched.
    if case.workdir == "under_file":
        return
    if not case.workdir_created:
        assert not workdir.exists(), f"{workdir} was created before validation failed"
    else:
        assert not (workdir / "metrics.jsonl").exists()
        if case.workdir != "reference_config":  # that one holds the copied run's checkpoints
            assert not (workdir / "checkpoints").exists()
        if config_before is None:
            assert not (workdir / "config.json").exists()
        else:
            assert (workdir / "config.json").read_bytes() == config_before


# In-process: the same checks are Config.validate() / check_resumable / check_workdir.


@pytest.mark.parametrize(
    "overrides, needles",
    [
        ({"loss": "hinge"}, ("--loss='hinge'", "sigmoid_mse, softmax_cross_entropy")),
        ({"optimizer": "rmsprop"}, ("--optimizer='rmsprop'", "adam, sgd")),
        ({"parallel": "fsdp"}, ("--parallel='fsdp'", "none, pmap, shard_map")),
        ({"compute_dtype": "float16"}, ("--compute_dtype", "bfloat16")),
        ({"batch_size": 0}, ("--batch_size=0",)),
        ({"eval_batch_size": -5}, ("--eval_batch_size=-5",)),
        ({"epochs": 0}, ("--epochs=0",)),
        ({"steps_per_dispatch": 0}, ("--steps_per_dispatch=0",)),
        ({"checkpoint_every_steps": 0}, ("--checkpoint_every_steps=0",)),
        ({"keep_checkpoints": 0}, ("--keep_checkpoints=0",)),
        ({"learning_rate": -1.0}, ("--learning_rate=-1.0",)),
        ({"learning_rate": 0.0}, ("--learning_rate=0.0",)),
        ({"learning_rate": float("nan")}, ("--learning_rate=nan",)),
        ({"momentum": 1.0}, ("--momentum=1.0",)),
        ({"dropout_rate": -0.1}, ("--dropout_rate=-0.1",)),
        ({"num_devices": -1}, ("--num_devices=-1",)),
        ({"num_devices": 2, "parallel": "none"}, ("--parallel=none", "--num_devices=2")),
        ({"seed": -1}, ("--seed=-1",)),
        ({"conv_blocks": "8;x"}, ("--conv_blocks='8;x'",)),
        ({"conv_blocks": "8;;16"}, ("--conv_blocks",)),
        ({"conv_blocks": "8,0"}, ("--conv_blocks",)),
        ({"dense_features": "32,-1"}, ("--dense_features",)),
        ({"dense_features": "a"}, ("--dense_features",)),
        ({"dataset": "CIFAR 10"}, ("--dataset",)),
        ({"dataset": ""}, ("--dataset",)),
    ],
)
def test_validate_rejects_bad_settings_naming_the_flag(overrides, needles):
    config = config_lib.Config(**{**FAST, **overrides})
    with pytest.raises(config_lib.ConfigError) as info:
        config.validate()
    message = str(info.value)
    assert "\n" not in message
    for needle in needles:
        assert needle in message


def test_validate_accepts_the_defaults_and_the_fast_settings():
    assert config_lib.Config().validate() == config_lib.Config()
    assert config_lib.Config(**FAST).validate() == config_lib.Config(**FAST)
    config_lib.Config(**{**FAST, "dense_features": ""}).validate()  # no hidden dense layer


def test_check_devices_names_the_batch_and_the_device_count():
    config = config_lib.Config(**{**FAST, "batch_size": 30, "parallel": "shard_map"})
    with pytest.raises(config_lib.ConfigError, match=r"--batch_size=30 .*number of devices \(4\); try --batch_size=28"):
        config.check_devices(4)
    with pytest.raises(config_lib.ConfigError, match=r"--eval_batch_size=100 .*\(8\)"):
        config_lib.Config(**{**FAST, "eval_batch_size": 100}).check_devices(8)
    config_lib.Config(**FAST).check_devices(4)


def test_check_workdir_rejects_a_path_under_a_file(tmp_path):
    regular = tmp_path / "file"
    regular.write_text("x")
    with pytest.raises(config_lib.ConfigError, match="--workdir=.* is not writable"):
        config_lib.check_workdir(str(regular / "sub"))
    assert config_lib.check_workdir(str(tmp_path / "new" / "dir")) == str(tmp_path / "new" / "dir")


@pytest.mark.parametrize(
    "saved, new, flag",
    [
        ({}, {"conv_blocks": "8;8"}, "--conv_blocks"),
        ({}, {"dense_features": "64"}, "--dense_features"),
        ({}, {"optimizer": "sgd"}, "--optimizer"),
        ({}, {"dataset": "cifar10"}, "--dataset"),
        ({"optimizer": "sgd", "momentum": 0.9}, {"optimizer": "sgd", "momentum": 0.0}, "--momentum"),
        ({"optimizer": "sgd", "momentum": 0.0}, {"optimizer": "sgd", "momentum": 0.5}, "--momentum"),
        ({}, {"epochs": 5, "learning_rate": 0.1, "loss": "sigmoid_mse", "steps_per_dispatch": 3}, None),
        ({"optimizer": "sgd", "momentum": 0.9}, {"optimizer": "sgd", "momentum": 0.5}, None),
    ],
)
def test_check_resumable_names_the_changed_shape_flag(tmp_path, saved, new, flag):
    path = tmp_path / "config.json"
    path.write_text(json.dumps({"config": config_lib.Config(**{**FAST, **saved}).to_dict()}))
    config = config_lib.Config(**{**FAST, **saved, **new}).validate()
    if flag is None:
        config_lib.check_resumable(config, str(path))
        return
    with pytest.raises(config_lib.ConfigError) as info:
        config_lib.check_resumable(config, str(path))
    assert str(info.value).startswith(flag + "=") and "\n" not in str(info.value)


# ----------------------------------------------------------------------------------------
# A NaN/Inf loss.


def nan_settings(learning_rate):
    return {"optimizer": "sgd", "learning_rate": learning_rate, "loss": "softmax_cross_entropy"}


@pytest.fixture(scope="module")
def nan_run_1e30(tmp_path_factory):
    workdir = tmp_path_factory.mktemp("nan_1e30") / "run"
    return workdir, run_cli(workdir, nan_settings(1e30))


@pytest.mark.slow
@pytest.mark.parametrize("learning_rate", [1e30, 10.0])
def test_non_finite_loss_stops_naming_the_step_and_keeps_earlier_checkpoints(
    learning_rate, tmp_path, request
):
    # 1e30 overflows in the first dispatch (before any checkpoint); 10 diverges at step 5,
    # after the checkpoint of step 4.
    settings = nan_settings(learning_rate)
    if learning_rate == 1e30:
        workdir, result = request.getfixturevalue("nan_run_1e30")
    else:
        workdir = tmp_path / "run"
        result = run_cli(workdir, settings)
    assert result.returncode == 1, describe(result)
    assert "Traceback" not in result.stderr
    lines = error_lines(result.stderr)
    assert len(lines) == 1, describe(result)
    match = re.search(r"training loss is (nan|inf|-inf) at step (\d+)", lines[0])
    assert match, lines
    bad_step = int(match.group(2))
    assert "final:" not in result.stdout
    records = read_records_lenient(workdir)
    assert all(r["step"] < bad_step for r in records)
    assert all(math.isfinite(v) for r in records for v in r.values())
    steps = checkpoint_steps(workdir)
    assert all(step < bad_step for step in steps)
    if learning_rate == 10.0:  # diverged at step 5 when written, after the step-4 checkpoint
        assert steps, f"no checkpoint before the NaN at step {bad_step}: pick a lower --learning_rate for this case"
    if steps:
        sgd_state = abstract_state_for({**FAST, **settings})
        restored = restore_latest(workdir, sgd_state)
        assert restored is not None and restored[0] == max(steps)
        assert restored[2]["step"] == max(steps)
        assert all(np.all(np.isfinite(x)) for x in jax.tree.leaves(restored[1]["params"]))


@pytest.mark.slow
def test_a_run_that_never_checkpointed_does_not_lock_the_workdir(nan_run_1e30):
    workdir, failed = nan_run_1e30
    assert failed.returncode == 1 and checkpoint_steps(workdir) == []
    result = run_cli(workdir, {"epochs": 1})  # the same run with the default optimizer (adam)
    assert result.returncode == 0, describe(result)
    assert eval_records(read_records(workdir))[-1]["step"] == STEPS_PER_EPOCH


# ----------------------------------------------------------------------------------------
# Several devices through the CLI.


@pytest.mark.slow
@pytest.mark.parametrize("parallel", ["pmap", "shard_map"])
def test_four_devices_match_one_device(reference, tmp_path, parallel):
    workdir = tmp_path / "run"
    result = run_cli(workdir, {"parallel": parallel}, ("--jax_num_cpu_devices=4",))
    assert result.returncode == 0, describe(result)
    assert "4 cpu device(s)" in result.stderr
    description = json.loads((workdir / "config.json").read_text())
    assert description["devices"]["used"] == 4 and description["config"]["parallel"] == parallel
    records = read_records(workdir)
    assert [r["step"] for r in records] == [r["step"] for r in reference.records]
    for got, want in zip(records, reference.records):
        assert set(got) == set(want)
        np.testing.assert_allclose(got["train_loss"], want["train_loss"], rtol=1e-4)
        np.testing.assert_allclose(got["train_accuracy"], want["train_accuracy"], atol=1.5 / 32)
        if "test_loss" in want:
            np.testing.assert_allclose(got["test_loss"], want["test_loss"], rtol=1e-4)
            assert abs(got["test_accuracy"] - want["test_accuracy"]) <= 1 / 200 + 1e-12
            assert got["test_examples"] == want["test_examples"] == 200
        else:
            np.testing.assert_allclose(got["grad_norm"], want["grad_norm"], rtol=1e-3)
    assert result.stdout.strip().splitlines()[-1].startswith("final:")
