"""Run a ``multiad`` command in a fresh process and measure its wall time and peak resident memory."""

from __future__ import annotations

import subprocess
import sys
import time

_CHILD = (
    "import resource, sys; from multiad_monai.apps.cli import main; code = main(sys.argv[1:]); "
    "print('PEAK_RSS_MB', resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024); sys.exit(code)"
)


def run_measured(args: list[str]) -> tuple[float, float]:
    """``multiad ARGS`` in a new Python process: (seconds, peak RSS in MB of that process); raises on failure."""
    start = time.perf_counter()
    result = subprocess.run([sys.executable, "-c", _CHILD, *args], capture_output=True, text=True)
    seconds = time.perf_counter() - start
    if result.returncode != 0:
        raise RuntimeError(f"multiad {' '.join(args)} failed:\n{result.stderr[-2000:]}")
    peak = [float(line.split()[1]) for line in result.stdout.splitlines() if line.startswith("PEAK_RSS_MB")][0]
    return seconds, peak
