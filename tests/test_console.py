"""The console of ``rsk-dist train jobs/quickstart.yaml``, run as a user runs it: each progress
and eval line once, no traceback, error-level line or Ray result dump; and a second run of the
finished run says so and trains nothing (issue 21, acceptance 2 and 4)."""
from __future__ import annotations

import logging
import os
import subprocess
import sys
from pathlib import Path

import pytest

from rsk_dist.console import DemoteToDebug
from tests.console_lines import console_problems

ROOT = Path(__file__).resolve().parents[1]
QUICKSTART = ROOT / "jobs" / "quickstart.yaml"
# jobs/quickstart.yaml: 3 epochs of 20 steps, a progress line every 10 steps and an eval per epoch
PROGRESS_LINES = 3 * 2 + 3


def test_demoted_notice_is_debug_and_once(caplog):
    logger = logging.getLogger("rsk_dist.test.notices")
    logger.addFilter(DemoteToDebug(logger, ("Found credentials",)))
    try:
        with caplog.at_level(logging.INFO, logger=logger.name):
            for _ in range(3):
                logger.info("Found credentials in environment variables.")
            logger.warning("something else")
        assert [r.getMessage() for r in caplog.records] == ["something else"]
        caplog.clear()
        with caplog.at_level(logging.DEBUG, logger=logger.name):
            for _ in range(3):
                logger.info("Found credentials in shared file")
        assert [(r.levelname, r.getMessage()) for r in caplog.records] == [("DEBUG", "Found credentials in shared file")]
    finally:
        logger.filters.clear()


def _train(tmp_path: Path) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    return subprocess.run(
        ["rsk-dist", "train", str(QUICKSTART), "--set", f"run.storage_path={tmp_path / 'runs'}"],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600,
    )


@pytest.mark.skipif(bool(os.environ.get("RSK_DIST_SKIP_RAY_JOBS")), reason="RSK_DIST_SKIP_RAY_JOBS is set")
def test_quickstart_console_once_each_then_finished(tmp_path):
    run = _train(tmp_path)
    console = run.stdout + run.stderr
    assert run.returncode == 0, console[-6000:]
    assert console_problems(console, PROGRESS_LINES) == [], console
    assert "finished quickstart in" in run.stdout and "recall@1:" in run.stdout

    again = _train(tmp_path)
    assert again.returncode == 0, again.stdout + again.stderr
    assert "run quickstart has already finished" in again.stdout, again.stdout
    assert "--set train.epochs=N" in again.stdout and "--set run.name=" in again.stdout
    assert str(tmp_path / "runs" / "quickstart") in again.stdout
    assert "[rsk-dist]" not in again.stdout + again.stderr, "a finished run trains nothing"
    assert not (tmp_path / "runs" / "quickstart" / "checkpoint_epoch_00004").exists()
