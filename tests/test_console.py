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



def test_ray_controllers_timed_out_resource_request_is_demoted():
    """The logger is taken from Ray's module itself, so a renamed module fails here. Ray's
    loggers do not propagate to the root (caplog's), so a handler sits on this one."""
    from ray.train.v2._internal.execution.scaling_policy import autoscaling_coordinator_client as client

    from rsk_dist.console import install_filters

    class Collect(logging.Handler):
        def __init__(self) -> None:
            super().__init__(logging.INFO)
            self.messages: list[str] = []

        def emit(self, record: logging.LogRecord) -> None:
            self.messages.append(record.getMessage())

    install_filters()
    handler, level = Collect(), client.logger.level
    client.logger.addHandler(handler)
    client.logger.setLevel(logging.INFO)
    try:
        try:
            raise TimeoutError("Get timed out: some object(s) not ready.")
        except TimeoutError:
            client.logger.warning("Failed to send resource request for train-1. If this only happens "
                                  "transiently ...", exc_info=True)
        client.logger.warning("another warning")
    finally:
        client.logger.removeHandler(handler)
        client.logger.setLevel(level)
    assert handler.messages == ["another warning"]

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


def test_ingest_progress_lines(tmp_path, capsys):
    """``rsk-dist ingest`` reports files, bytes and percent on stderr: a line at the start and
    the last at 100%, never one per shard (here every line after the first is throttled away
    but the last, with an interval far longer than the test)."""
    from rsk_dist.cli import main
    from rsk_dist.cli.data import IngestProgress
    from tests.images import image_bytes

    src = tmp_path / "src"
    for c in range(3):
        for i in range(4):
            path = src / f"class{c}" / f"{i}.png"
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(image_bytes(10 * c + i))
    total = sum(p.stat().st_size for p in src.rglob("*.png"))
    assert main(["ingest", str(src), str(tmp_path / "out"), "--layout", "folders", "--shard-mb", "0.0005"]) == 0
    lines = [line for line in capsys.readouterr().err.splitlines() if line.startswith("ingest:")]
    assert lines[0].startswith("ingest: 0/12 files, 0 B of ") and lines[-1].startswith("ingest: 12/12 files, ")
    assert "(100%)" in lines[-1] and 2 <= len(lines) < 12, lines  # several shards: ~600 bytes each

    out: list[str] = []
    throttled = IngestProgress(every_s=3600, out=type("W", (), {"write": out.append, "flush": lambda self: None})())
    for done in range(0, total + 1, max(1, total // 10)):
        throttled(done * 12 // total, 12, done, total)
    throttled(12, 12, total, total)
    progress = [line for line in "".join(out).splitlines() if line]
    assert len(progress) == 2 and progress[0].startswith("ingest: 0/12 files") and "(100%)" in progress[1], progress
