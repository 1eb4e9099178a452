"""metrics.py (writer, progress, NaN guard) and config.py (validation, resumability)."""

import io
import json

import pytest

from softsig import config as config_lib
from softsig import metrics


def test_writer_appends_and_truncates_after_a_step(tmp_path):
    writer = metrics.MetricsWriter(str(tmp_path))
    for step in (2, 4, 6):
        writer.write({"step": step, "epoch": step / 4, "train_loss": 1.0 / step})
    with open(tmp_path / "metrics.jsonl", "a") as f:
        f.write('{"step": 8, "trunc')  # a line cut short by kill -9
    writer.truncate_after(4)
    writer.close()
    assert [r["step"] for r in metrics.read_metrics(str(tmp_path))] == [2, 4]
    assert (tmp_path / "tensorboard").is_dir()


def test_disabled_writer_writes_nothing(tmp_path):
    writer = metrics.MetricsWriter(str(tmp_path), enabled=False)
    writer.write({"step": 1, "epoch": 0.1, "train_loss": 1.0})
    assert not (tmp_path / "metrics.jsonl").exists()


def test_check_finite_names_the_step():
    metrics.check_finite([1.0, 2.0], first_step=10)
    with pytest.raises(metrics.NonFiniteLossError, match="at step 12"):
        metrics.check_finite([1.0, float("nan")], first_step=10)


class FakeTerminal(io.StringIO):
    def isatty(self):
        return True


def test_progress_redraws_one_line_on_a_terminal_and_logs_lines_otherwise():
    tty = FakeTerminal()
    progress = metrics.Progress(100, stream=tty)
    progress.update(10, 0, 2.0, 500.0)
    progress.update(20, 0, 1.5, 500.0)
    progress.message("epoch 1: done")
    progress.close()
    text = tty.getvalue()
    assert text.count("\r\x1b[K") == 3 and "step 20/100 (20%)" in text and "ETA" in text
    plain = io.StringIO()
    progress = metrics.Progress(100, stream=plain, log_every_s=3600)
    for step in (10, 20, 100):
        progress.update(step, 0, 1.0, 100.0)
    lines = plain.getvalue().splitlines()
    assert len(lines) == 2 and "\r" not in plain.getvalue()  # first and last, rate-limited between
    assert "step 100/100" in lines[-1]


@pytest.mark.parametrize(
    "kwargs, flag",
    [
        ({"loss": "hinge"}, "--loss='hinge' is not valid; valid values: sigmoid_mse, softmax_cross_entropy"),
        ({"optimizer": "rmsprop"}, "--optimizer='rmsprop' is not valid; valid values: adam, sgd"),
        ({"parallel": "fsdp"}, "valid values: none, pmap, shard_map"),
        ({"batch_size": 0}, "--batch_size=0 must be a positive integer"),
        ({"epochs": -1}, "--epochs=-1"),
        ({"learning_rate": -1.0}, "--learning_rate=-1.0 must be positive"),
        ({"momentum": 1.0}, "--momentum"),
        ({"conv_blocks": "32,x"}, "--conv_blocks"),
        ({"dense_features": "0"}, "--dense_features"),
        ({"dataset": "CIFAR 10"}, "--dataset"),
        ({"parallel": "none", "num_devices": 2}, "--parallel=none"),
    ],
)
def test_bad_flags_name_the_flag(kwargs, flag):
    with pytest.raises(config_lib.ConfigError) as error:
        config_lib.Config(**kwargs).validate()
    assert flag in str(error.value) and "\n" not in str(error.value)


def test_batch_size_against_devices():
    config_lib.Config(batch_size=128, eval_batch_size=1000).check_devices(8)
    with pytest.raises(config_lib.ConfigError, match=r"--batch_size=30 must be a multiple of the number of devices \(4\)"):
        config_lib.Config(batch_size=30).check_devices(4)


def test_unwritable_workdir(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    with pytest.raises(config_lib.ConfigError, match="--workdir"):
        config_lib.check_workdir(str(blocker / "sub"))


def test_shape_flags_against_an_existing_run(tmp_path):
    path = tmp_path / "config.json"
    path.write_text(json.dumps({"config": config_lib.Config().to_dict()}))
    config_lib.check_resumable(config_lib.Config(learning_rate=0.5, epochs=20), str(path))  # allowed
    with pytest.raises(config_lib.ConfigError, match="--conv_blocks='16;32' differs"):
        config_lib.check_resumable(config_lib.Config(conv_blocks="16;32"), str(path))
    with pytest.raises(config_lib.ConfigError, match="--optimizer"):
        config_lib.check_resumable(config_lib.Config(optimizer="sgd"), str(path))
