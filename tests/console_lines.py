"""What a training run's console may hold: each rank-0 progress and eval line once, and no
traceback, error-level line or Ray result dump (issue 21)."""
from __future__ import annotations

import re
from collections import Counter

ANSI = re.compile(r"\x1b\[[0-9;]*m")
RAY_PREFIX = re.compile(r"^\((?:[\w.]+ )?pid=[^)]*\)\s*")  # "(RayTrainWorker pid=1, ip=...) "
NOISE = [
    re.compile(p) for p in (
        r"Traceback \(most recent call last\)",
        r"\bERROR\b",
        r"^\[[\d\- :,]+ E \d+ \d+\]",  # Ray's C++ error lines
        r"^\*\*\* SIGTERM received",
        r"TrainingReport\(",
        r"Found multiple active Ray instances",
        r"Failed to query Ray Train Controller",
        r"Found credentials in",
        r"Token authentication is enabled",
    )
]


def plain_lines(text: str) -> list[str]:
    """The lines of a console, without colour codes and Ray's ``(Actor pid=...)`` prefixes."""
    return [RAY_PREFIX.sub("", ANSI.sub("", line)).rstrip() for line in text.splitlines()]


def console_problems(text: str, progress_lines: int) -> list[str]:
    """What is wrong with a run's console: ``[rsk-dist]`` lines repeated or missing (there
    should be ``progress_lines``), and every noise line."""
    lines = plain_lines(text)
    ours = [line for line in lines if line.startswith("[rsk-dist]")]
    problems = [f"printed {n} times: {line}" for line, n in Counter(ours).items() if n > 1]
    if len(ours) != progress_lines:
        problems.append(f"{len(ours)} [rsk-dist] lines, expected {progress_lines}")
    problems += [f"noise: {line}" for line in lines if any(p.search(line) for p in NOISE)]
    return problems
