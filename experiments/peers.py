r"""Peer implementations of softsig's default CNN train step, run as benchmark workers.

The same network (conv32-conv32-pool-conv64-conv64-pool-dense512-dense10, ReLU, 'SAME'
padding, 2,168,362 parameters), the same optimizer (Adam, lr 1e-3, eps 1e-8) and the same
loss (softmax cross-entropy on integer labels) in other frameworks, so that
``experiments/bench.py --peers=...`` can time them against softsig in one run, interleaved.

Each implementation runs in its own process (frameworks' thread pools would otherwise
compete): ``bench.py`` starts ``python experiments/peers.py --impl=NAME --batch_size=B``,
waits for one JSON line ``{"ready": ...}``, then sends ``run N`` lines and reads back
``{"seconds": ...}`` for N train steps on one fixed batch (synchronised at the end); ``quit``
ends it. ``PeerWorker`` and ``compare_with_peers`` below are that harness side. Peers need ``pip install -e .[bench]`` (torch); Keras/TF come with tensorflow-cpu.
softsig itself never imports this file.
"""

import json
import os
import statistics
import subprocess
import sys
import time

IMPLEMENTATIONS = ("keras", "keras_xla", "torch", "torch_channels_last", "torch_compile")
NUM_CLASSES = 10


def _keras_step(batch_size: int, jit_compile: bool):
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    os.environ.setdefault("KERAS_BACKEND", "tensorflow")
    import keras
    import numpy as np
    from keras import layers

    model = keras.Sequential([
        keras.Input((32, 32, 3)),
        layers.Conv2D(32, 3, padding="same", activation="relu"),
        layers.Conv2D(32, 3, padding="same", activation="relu"),
        layers.MaxPooling2D(),
        layers.Conv2D(64, 3, padding="same", activation="relu"),
        layers.Conv2D(64, 3, padding="same", activation="relu"),
        layers.MaxPooling2D(),
        layers.Flatten(),
        layers.Dense(512, activation="relu"),
        layers.Dense(NUM_CLASSES),
    ])
    model.compile(
        optimizer=keras.optimizers.Adam(1e-3, epsilon=1e-8),
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        jit_compile=jit_compile,
    )
    rng = np.random.default_rng(0)
    images = rng.standard_normal((batch_size, 32, 32, 3), dtype=np.float32)
    labels = rng.integers(0, NUM_CLASSES, batch_size).astype(np.int32)

    def steps(count: int) -> None:
        for _ in range(count):
            loss = model.train_on_batch(images, labels)
        float(loss)  # train_on_batch returns host values: already synchronised

    return steps, model.count_params()


def _torch_step(batch_size: int, channels_last: bool, compile_model: bool):
    import torch
    from torch import nn

    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(3, 32, 3, padding=1), nn.ReLU(),
        nn.Conv2d(32, 32, 3, padding=1), nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Conv2d(32, 64, 3, padding=1), nn.ReLU(),
        nn.Conv2d(64, 64, 3, padding=1), nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Flatten(),
        nn.Linear(64 * 8 * 8, 512), nn.ReLU(),
        nn.Linear(512, NUM_CLASSES),
    )
    images = torch.randn(batch_size, 3, 32, 32)
    labels = torch.randint(0, NUM_CLASSES, (batch_size,))
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
        images = images.contiguous(memory_format=torch.channels_last)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3, eps=1e-8, fused=True)
    loss_fn = nn.CrossEntropyLoss()

    def train_step():
        optimizer.zero_grad(set_to_none=True)
        loss = loss_fn(model(images), labels)
        loss.backward()
        optimizer.step()
        return loss

    if compile_model:  # the usual recipe: compile the module, keep the fused optimizer step eager
        model = torch.compile(model)

    def steps(count: int) -> None:
        for _ in range(count):
            loss = train_step()
        loss.item()

    return steps, sum(p.numel() for p in model.parameters())


def build(impl: str, batch_size: int):
    """``(run_steps(count), num_params)`` for one implementation."""
    if impl == "keras":
        return _keras_step(batch_size, jit_compile=False)
    if impl == "keras_xla":
        return _keras_step(batch_size, jit_compile=True)
    if impl in ("torch", "torch_channels_last", "torch_compile"):
        return _torch_step(batch_size, channels_last=impl != "torch", compile_model=impl == "torch_compile")
    raise ValueError(f"unknown peer {impl!r}; choose from {', '.join(IMPLEMENTATIONS)}")


def serve(impl: str, batch_size: int, warmup_steps: int = 3) -> None:
    """The worker loop described in the module docstring."""
    start = time.perf_counter()
    try:
        steps, num_params = build(impl, batch_size)
        steps(warmup_steps)
    except Exception as error:  # reported to the harness, which skips this peer
        print(json.dumps({"ready": False, "error": f"{type(error).__name__}: {error}"}), flush=True)
        return
    print(json.dumps({"ready": True, "params": num_params, "setup_seconds": time.perf_counter() - start}), flush=True)
    for line in sys.stdin:
        command = line.split()
        if not command or command[0] == "quit":
            return
        count = int(command[1])
        start = time.perf_counter()
        steps(count)
        print(json.dumps({"seconds": time.perf_counter() - start}), flush=True)


# --- The harness side (used by bench.py) ---


class PeerWorker:
    """One ``experiments/peers.py`` process: built and warmed up once, then timed on request."""

    def __init__(self, impl: str, batch_size: int):
        self.impl = impl
        env = dict(os.environ)
        env.pop("XLA_FLAGS", None)  # our XLA:CPU flags are not TF's business; GLIBC_TUNABLES is kept
        script = os.path.abspath(__file__)
        self.process = subprocess.Popen(
            [sys.executable, script, f"--impl={impl}", f"--batch_size={batch_size}"],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, env=env,
        )
        self.batch_size = batch_size
        self.ready = self._read()

    def _read(self) -> dict:
        line = self.process.stdout.readline()
        if not line:
            return {"ready": False, "error": f"exited with status {self.process.wait()}"}
        return json.loads(line)

    def images_per_second(self, steps: int) -> float:
        self.process.stdin.write(f"run {steps}\n")
        self.process.stdin.flush()
        reply = self._read()
        if "seconds" not in reply:
            raise RuntimeError(f"peer {self.impl} stopped during a timed round: {reply.get('error', reply)}")
        return steps * self.batch_size / reply["seconds"]

    def close(self) -> None:
        if self.process.poll() is None:
            try:
                self.process.stdin.write("quit\n")
                self.process.stdin.close()
                self.process.wait(timeout=60)
            except (OSError, subprocess.TimeoutExpired):
                self.process.kill()


def compare_with_peers(softsig_round, impls, batch_size: int, steps: int, rounds: int, pause: float = 0.5) -> dict:
    """Interleaved rounds: every implementation runs ``steps`` steps per round; ratios are per round."""
    workers, skipped, results = [], {}, {}
    for impl in impls:
        print(f"starting peer {impl} ...", flush=True)
        worker = PeerWorker(impl, batch_size)
        if worker.ready.get("ready"):
            workers.append(worker)
        else:
            skipped[impl] = {"skipped": worker.ready.get("error", "did not start")}
            print(f"peer {impl} skipped: {skipped[impl]['skipped']}", flush=True)
            worker.close()
    per_round = {"softsig": [], **{w.impl: [] for w in workers}}
    try:
        for round_index in range(rounds):
            time.sleep(pause)
            per_round["softsig"].append(softsig_round())
            for worker in workers:
                time.sleep(pause)  # let the previous implementation's threads go idle
                per_round[worker.impl].append(worker.images_per_second(steps))
            print(f"round {round_index + 1}/{rounds}: " + ", ".join(f"{k} {v[-1]:.0f}" for k, v in per_round.items()),
                  flush=True)
    finally:
        for worker in workers:
            worker.close()
    for impl, values in per_round.items():
        ratios = [softsig / value for softsig, value in zip(per_round["softsig"], values)]
        results[impl] = {
            "images_per_second_median": statistics.median(values),
            "images_per_second_per_round": values,
            "softsig_speed_ratio_median": statistics.median(ratios),  # softsig img/s / this img/s
        }
    return {**results, **skipped}


def format_peer_table(peers: dict, batch_size: int) -> str:
    lines = [f"\ninterleaved rounds, batch {batch_size}, fp32 (softsig / peer > 1: softsig faster)",
             "| implementation | images/s (median) | softsig / implementation |", "|---|---|---|"]
    for impl, result in peers.items():
        if "skipped" in result:
            lines.append(f"| {impl} | skipped: {result['skipped']} | |")
        else:
            lines.append(f"| {impl} | {result['images_per_second_median']:.0f} | "
                         f"{result['softsig_speed_ratio_median']:.2f} |")
    return "\n".join(lines)


def main(argv: list[str]) -> None:
    options = dict(arg.lstrip("-").split("=", 1) for arg in argv[1:])
    serve(options["impl"], int(options.get("batch_size", 128)))


if __name__ == "__main__":
    main(sys.argv)
