"""Two local processes x 2 CPU devices (gloo) against one process with 4 devices, via the CLI."""

import json
import os
import socket
import subprocess
import sys

import numpy as np
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FLAGS = [
    "--dataset=synthetic", "--train_split=train[:512]", "--test_split=test[:200]", "--batch_size=32",
    "--eval_batch_size=100", "--epochs=1", "--conv_blocks=8;16", "--dense_features=32",
    "--steps_per_dispatch=4", "--checkpoint_every_steps=8",
]
TIMING = {"images_per_second", "dispatch_seconds", "eval_seconds"}


def child_env():
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2")
    env["XLA_FLAGS"] = env.get("XLA_FLAGS", "").replace("--xla_force_host_platform_device_count=8", "")
    return env


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def train_cmd(workdir, *extra):
    return [sys.executable, os.path.join(ROOT, "experiments", "train.py"), f"--workdir={workdir}", *FLAGS, *extra]


def records(workdir):
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        return [{k: v for k, v in json.loads(line).items() if k not in TIMING} for line in f]


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["shard_map", "pmap"])
def test_two_processes_match_one_process_with_four_devices(tmp_path, mode):
    port = free_port()
    multi = tmp_path / "multi"
    procs = [
        subprocess.Popen(
            train_cmd(multi, f"--parallel={mode}", "--jax_num_cpu_devices=2",
                      f"--coordinator_address=127.0.0.1:{port}", "--num_processes=2", f"--process_id={i}"),
            cwd=ROOT, env=child_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        )
        for i in range(2)
    ]
    outputs = []
    for proc in procs:
        try:
            outputs.append(proc.communicate(timeout=420)[0])
        finally:
            proc.kill()
    for proc, out in zip(procs, outputs):
        assert proc.returncode == 0, out[-3000:]
    assert "on 4 cpu device(s)" in outputs[0]
    single = tmp_path / "single"
    result = subprocess.run(
        train_cmd(single, f"--parallel={mode}", "--jax_num_cpu_devices=4"),
        cwd=ROOT, env=child_env(), capture_output=True, text=True, timeout=240,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    got, expected = records(multi), records(single)
    assert [r["step"] for r in got] == [r["step"] for r in expected]
    for a, b in zip(got, expected):
        assert a.keys() == b.keys()
        for key in a:
            np.testing.assert_allclose(a[key], b[key], rtol=1e-5, err_msg=key)
    # Only process 0 writes metrics; both processes took part in every checkpoint.
    assert sorted(os.listdir(multi / "checkpoints" / "latest")) == ["16", "8"]
