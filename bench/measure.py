"""Shared measurement for the benchmarks: each case runs in a fresh Python process, so that its
peak memory growth (peak RSS on CPU, peak allocated on CUDA) is its own and not an earlier
case's high-water mark."""
from __future__ import annotations

import json
import platform
import resource
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]


def rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize()


def peak_rss_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def measure(run: Callable[[], None], device: str, repeats: int = 2, warmup: bool = True) -> dict[str, float]:
    """Seconds of the fastest of ``repeats`` runs and their mean (after one warm-up run unless
    ``warmup`` is False: for slow baselines whose first-call overhead is negligible), and peak
    memory growth over the memory held before the first run."""
    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    else:
        base = rss_bytes()
    if warmup:
        run()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        run()
        if device == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    peak = torch.cuda.max_memory_allocated() if device == "cuda" else peak_rss_bytes()
    return {"seconds": min(times), "mean_seconds": sum(times) / len(times), "peak_growth_mb": (peak - base) / 2**20}


def in_subprocess(script: str, args: list[str], timeout: float = 1800) -> dict:
    """Runs ``script --case ARGS`` in a fresh interpreter; it prints one JSON line last."""
    proc = subprocess.run(
        [sys.executable, script, "--case", *args], capture_output=True, text=True, timeout=timeout, cwd=REPO
    )
    if proc.returncode != 0:
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-1:] or ["no output"]
        return {"error": f"exit {proc.returncode}: {tail[0][:120]}"}
    return json.loads(proc.stdout.strip().splitlines()[-1])


def machine() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    gpu = f", {torch.cuda.get_device_name()}" if torch.cuda.is_available() else ""
    return f"{cpu}, {torch.get_num_threads()} threads{gpu}, torch {torch.__version__}"


def table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(lines)
