"""Checkpointer: round trip, latest vs best, fallback over damaged steps."""

import os

import numpy as np
import pytest

from softsig.checkpoint import Checkpointer


def state_at(step):
    return {"step": np.int32(step), "params": {"w": np.full((3, 2), step, np.float32)}, "key": np.arange(2, dtype=np.uint32)}


def abstract():
    return state_at(0)


def test_round_trip_and_meta(tmp_path):
    ckpt = Checkpointer(str(tmp_path), keep=2)
    ckpt.save(4, state_at(4), {"step": 4, "epoch_sums": {"loss": 0.1 + 0.2}})
    ckpt.close()
    step, state, meta = Checkpointer(str(tmp_path)).restore_latest(abstract())
    assert step == 4 and meta["epoch_sums"]["loss"] == 0.1 + 0.2  # floats survive JSON exactly
    np.testing.assert_array_equal(state["params"]["w"], state_at(4)["params"]["w"])
    assert state["key"].dtype == np.uint32


def test_empty_directory_restores_nothing(tmp_path):
    assert Checkpointer(str(tmp_path)).restore_latest(abstract()) is None


def test_best_is_kept_apart_and_never_evicts_the_latest(tmp_path):
    ckpt = Checkpointer(str(tmp_path), keep=2)
    for step, accuracy in [(1, 0.5), (2, 0.9), (3, 0.4), (4, 0.3)]:
        ckpt.save(step, state_at(step), {"step": step}, test_accuracy=accuracy)
    ckpt.close()
    assert sorted(os.listdir(tmp_path / "latest")) == ["3", "4"]
    assert os.listdir(tmp_path / "best") == ["2"]
    assert Checkpointer(str(tmp_path)).restore_latest(abstract())[0] == 4


@pytest.mark.parametrize("damage", ["truncate", "delete_state", "empty_dir"])
def test_damaged_newest_step_falls_back_to_the_previous_one(tmp_path, damage, caplog):
    ckpt = Checkpointer(str(tmp_path), keep=3)
    for step in (2, 4):
        ckpt.save(step, state_at(step), {"step": step})
    ckpt.close()
    newest = tmp_path / "latest" / "4"
    if damage == "truncate":
        for root, _, files in os.walk(newest / "state"):
            for name in files:
                open(os.path.join(root, name), "w").close()
    elif damage == "delete_state":
        for root, _, files in os.walk(newest / "state"):
            for name in files:
                os.remove(os.path.join(root, name))
    else:
        for root, dirs, files in os.walk(newest, topdown=False):
            for name in files:
                os.remove(os.path.join(root, name))
            for name in dirs:
                os.rmdir(os.path.join(root, name))
    step, state, _ = Checkpointer(str(tmp_path)).restore_latest(abstract())
    assert step == 2
    np.testing.assert_array_equal(state["params"]["w"], state_at(2)["params"]["w"])


def test_fresh_directory_needs_orbax_only_from_the_first_save(tmp_path):
    """A fresh run reaches its first step without importing orbax; the first save then works,
    and the same Checkpointer restores what it saved."""
    import subprocess
    import sys

    script = f"""
import sys
import numpy as np
from softsig.checkpoint import Checkpointer, has_checkpoint
ckpt = Checkpointer({str(tmp_path)!r})
state = {{"w": np.arange(3, dtype=np.float32)}}
assert ckpt.restore_latest(state) is None
assert "orbax.checkpoint" not in sys.modules, "orbax imported before the first save"
ckpt.save(7, {{"w": np.full(3, 7, np.float32)}}, {{"step": 7}}, test_accuracy=0.5)
ckpt.wait()
step, restored, meta = ckpt.restore_latest(state)
assert step == 7 and restored["w"].tolist() == [7, 7, 7] and meta["test_accuracy"] == 0.5
ckpt.close()
assert has_checkpoint({str(tmp_path)!r})
print("ok")
"""
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert result.stdout.strip().endswith("ok"), result.stderr[-2000:]
    assert os.listdir(tmp_path / "best") == ["7"]
