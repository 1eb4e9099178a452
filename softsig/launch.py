"""Process-level settings that make XLA:CPU training faster; applied by re-executing once.

Two effects measured on the 2-core dev VM (BUILD_NOTES.md, "CPU environment"):
XLA:CPU routes convolutions to YNNPACK by default, slower than Eigen here
(``--xla_cpu_experimental_ynn_fusion_type=`` turns it off), and glibc returns large buffers
to the OS and page-faults them back every step (``GLIBC_TUNABLES`` keeps them). glibc reads
its tunables only at process start, hence the re-exec. Neither touches GPU/TPU compilation.
Set ``SOFTSIG_TUNE_CPU_ENV=0`` to run with the environment as given.
"""

from __future__ import annotations

import os
import sys
import time

_IMPORTED_AT = time.perf_counter()

YNN_OFF_FLAG = "--xla_cpu_experimental_ynn_fusion_type="
GLIBC_TUNABLES = "glibc.malloc.arena_max=1:glibc.malloc.mmap_max=0:glibc.malloc.trim_threshold=4294967296"
_MARKER = "SOFTSIG_CPU_ENV_APPLIED"


def tuned_environment(environ: dict[str, str]) -> dict[str, str]:
    """``environ`` plus the CPU settings (existing user choices are kept)."""
    env = dict(environ)
    if "xla_cpu_experimental_ynn_fusion_type" not in env.get("XLA_FLAGS", ""):
        env["XLA_FLAGS"] = (env.get("XLA_FLAGS", "") + " " + YNN_OFF_FLAG).strip()
    env.setdefault("GLIBC_TUNABLES", GLIBC_TUNABLES)
    env[_MARKER] = "1"
    return env


def reexec_with_tuned_cpu_environment() -> None:
    """Re-executes the current command once with ``tuned_environment`` (before JAX is imported)."""
    if os.environ.get(_MARKER) or os.environ.get("SOFTSIG_TUNE_CPU_ENV", "1") == "0" or "jax" in sys.modules:
        return
    env = tuned_environment(os.environ)
    sys.stdout.flush()
    sys.stderr.flush()
    os.execve(sys.executable, [sys.executable, *sys.argv], env)


def describe_environment() -> dict[str, str]:
    """What a benchmark or run should record about these settings."""
    return {
        "xla_flags": os.environ.get("XLA_FLAGS", ""),
        "glibc_tunables": os.environ.get("GLIBC_TUNABLES", ""),
        "tuned_by_softsig": os.environ.get(_MARKER, "0"),
    }


def seconds_since_process_start() -> float:
    """Wall time since this process started, re-exec and imports included.

    Linux keeps a process's start time across ``execve``, so this counts from the command
    the user typed; elsewhere it counts from this module's import.
    """
    try:
        with open("/proc/self/stat") as f:
            start_ticks = int(f.read().rsplit(")", 1)[1].split()[19])  # field 22, starttime
        with open("/proc/uptime") as f:
            uptime = float(f.read().split()[0])
        return uptime - start_ticks / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError):
        return time.perf_counter() - _IMPORTED_AT
