"""metrics.py (writer, progress, NaN guard) and config.py (validation, resumability)."""

import io
import json
import math

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


def test_crc32c_known_values():
    assert metrics.crc32c(b"") == 0
    assert metrics.crc32c(b"123456789") == 0xE3069283  # the CRC-32C check value
    assert metrics.crc32c(bytes(32)) == 0x8A9136AA  # RFC 3720, B.4


def read_events_with_tensorflow(path):
    """Events parsed by TensorFlow's own TFRecord reader (checks both CRCs) and Event proto."""
    tf = pytest.importorskip("tensorflow")
    from tensorflow.core.util import event_pb2

    return [event_pb2.Event.FromString(record.numpy()) for record in tf.data.TFRecordDataset(str(path))]


def test_event_file_is_what_tensorflow_reads(tmp_path):
    writer = metrics.EventFileWriter(str(tmp_path / "tb"))
    writer.add_scalars(3, {"train_loss": 0.1, "test_error_rate": 0.25})
    writer.add_scalars(2**40, {"train_loss": float("nan"), "lr": -1e-3})
    writer.close()
    events = read_events_with_tensorflow(writer.path)
    assert events[0].file_version == "brain.Event:2" and events[0].wall_time > 1e9
    assert [event.step for event in events[1:]] == [3, 2**40]
    first = {value.tag: value.simple_value for value in events[1].summary.value}
    assert first == {"train_loss": pytest.approx(0.1, rel=1e-7), "test_error_rate": 0.25}
    second = {value.tag: value.simple_value for value in events[2].summary.value}
    assert math.isnan(second["train_loss"]) and second["lr"] == pytest.approx(-1e-3, rel=1e-7)

    data = bytearray(open(writer.path, "rb").read())
    data[-5] ^= 1  # one flipped bit in the last event: TensorFlow's CRC check must catch it
    (tmp_path / "bad").write_bytes(bytes(data))
    with pytest.raises(Exception, match="(?i)corrupt|checksum|data ?loss"):
        read_events_with_tensorflow(tmp_path / "bad")


def test_metrics_writer_mirrors_numeric_scalars_to_tensorboard(tmp_path):
    writer = metrics.MetricsWriter(str(tmp_path))
    writer.write({"step": 5, "epoch": 0.5, "train_loss": 1.5, "train_accuracy": [0.1, 0.2], "note": "x", "flag": True})
    writer.close()
    (path,) = (tmp_path / "tensorboard").glob("events.out.tfevents.*")
    events = read_events_with_tensorflow(path)
    assert [(event.step, [(v.tag, v.simple_value) for v in event.summary.value]) for event in events[1:]] == [
        (5, [("train_loss", 1.5)])
    ]


def test_seconds_since_process_start_counts_from_the_command_across_a_reexec(tmp_path):
    """The clock behind "time to first step" starts with the process, not with an import, and
    survives the launcher's re-exec."""
    import subprocess
    import sys
    import time

    script = (
        "import os, sys, time\n"
        "if not os.environ.get('REEXECED'):\n"
        "    time.sleep(0.3)\n"
        "    os.execve(sys.executable, [sys.executable, *sys.argv], {**os.environ, 'REEXECED': '1'})\n"
        "time.sleep(0.2)\n"
        "from softsig import launch\n"
        "print(launch.seconds_since_process_start())\n"
    )
    (tmp_path / "script.py").write_text(script)
    start = time.monotonic()
    result = subprocess.run([sys.executable, str(tmp_path / "script.py")], capture_output=True, text=True, timeout=60)
    wall = time.monotonic() - start
    assert result.returncode == 0, result.stderr[-2000:]
    reported = float(result.stdout.strip().splitlines()[-1])
    assert 0.5 <= reported <= wall + 0.02  # 10 ms clock ticks


def test_tensorboard_itself_reads_the_scalars(tmp_path):
    """When TensorBoard is installed (not a dependency), its own loader sees every scalar."""
    accumulator = pytest.importorskip("tensorboard.backend.event_processing.event_accumulator")
    writer = metrics.MetricsWriter(str(tmp_path))
    for step in (10, 20):
        writer.write({"step": step, "epoch": step / 20, "train_loss": 1.0 / step})
    writer.write({"step": 20, "epoch": 1.0, "test_error_rate": 0.25})
    writer.close()
    loaded = accumulator.EventAccumulator(str(tmp_path / "tensorboard"))
    loaded.Reload()
    assert sorted(loaded.Tags()["scalars"]) == ["test_error_rate", "train_loss"]
    assert [(e.step, e.value) for e in loaded.Scalars("train_loss")] == [(10, pytest.approx(0.1)), (20, pytest.approx(0.05))]
    assert [(e.step, e.value) for e in loaded.Scalars("test_error_rate")] == [(20, 0.25)]
