"""``rsk-dist submit/status/logs/stop`` against a real Ray head with its job server.

A head (``ray start --head --block``, the dashboard and job server on 127.0.0.1) is started in
its own session for this module, and torn down by signalling that session's process group and
then any process left with this module's unique temp dir on its command line: only processes
these tests started are ended (``ray stop`` would end every Ray on the machine).

Needs Ray's dashboard (``ray[default]``): skipped with the reason where it is not installed.
Set ``RSK_DIST_SKIP_RAY_JOBS=1`` to skip the module on a busy machine.
"""
from __future__ import annotations

import os
import secrets
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import pytest

from rsk_dist.cli import main  # noqa: E402
from tests.conftest import free_ports  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
QUICKSTART = ROOT / "jobs" / "quickstart.yaml"
JOB_TIMEOUT_S = 300
TINY = ["--set", "train.epochs=1", "--set", "train.steps_per_epoch=5", "--set", "train.log_every=1"]


def _dashboard_missing() -> str | None:
    from ray._private.utils import get_dashboard_dependency_error

    err = get_dashboard_dependency_error()
    return None if err is None else f"Ray's job server needs ray[default] (dashboard): {err}"


pytestmark = [
    pytest.mark.skipif(bool(os.environ.get("RSK_DIST_SKIP_RAY_JOBS")), reason="RSK_DIST_SKIP_RAY_JOBS is set"),
]


def _kill_leftovers(marker: str) -> None:
    """SIGKILL, by pid, any process whose command line names this head's own temp dir."""
    me = os.getpid()
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == me:
            continue
        try:
            cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        if marker in cmdline:
            try:
                os.kill(int(entry.name), signal.SIGKILL)
            except OSError:
                pass


def _path_without_console_script(bin_dir: Path) -> str:
    """A PATH whose ``python`` is this interpreter (a wrapper script in ``bin_dir``) and on
    which no ``rsk-dist`` console script is found: an image without the package installed."""
    bin_dir.mkdir(parents=True, exist_ok=True)
    wrapper = bin_dir / "python"
    wrapper.write_text(f'#!/bin/sh\nexec {shlex.quote(sys.executable)} "$@"\n')
    wrapper.chmod(0o755)
    venv_bin = str(Path(sys.executable).parent)
    rest = [p for p in os.environ.get("PATH", "").split(os.pathsep) if p and p != venv_bin]
    path = os.pathsep.join([str(bin_dir), *rest])
    assert shutil.which("rsk-dist", path=path) is None, "the console script must not be on the head's PATH"
    return path


class RayHead:
    """A Ray head node with its dashboard/job server on 127.0.0.1, token authentication on, and
    no ``rsk-dist`` console script on its PATH (jobs run ``python -m rsk_dist.cli``)."""

    def __init__(self) -> None:
        self.token = secrets.token_hex(32)
        self.temp_dir = tempfile.mkdtemp(prefix="rsk-ray-", dir="/tmp")  # short: socket paths
        gcs, dash, client, agent = free_ports(4)
        self.address = f"http://127.0.0.1:{dash}"
        env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}
        env.update(
            PATH=_path_without_console_script(Path(self.temp_dir) / "bin"),
            RAY_USAGE_STATS_ENABLED="0",
            # Ray's single-machine mode: every node address is the loopback one.
            RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER="0",
            # Token authentication on, as on a real cluster (Ray 2.60 turns it on anyway when
            # ~/.ray/auth_token exists); the job's own driver inherits the token.
            RAY_AUTH_MODE="token",
            RAY_AUTH_TOKEN=self.token,
            # No drain on SIGTERM (Ray's default waits up to 30 s for the node to drain; this
            # head's own actors keep it busy to the end): stop() tears it down at once.
            RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S="0",
        )
        self.log = open(Path(self.temp_dir) / "ray-start.log", "wb")
        ray_cli = [sys.executable, "-c", "from ray.scripts.scripts import main; main()"]
        self.proc = subprocess.Popen(
            [*ray_cli, "start", "--head", "--block", f"--port={gcs}",
             "--dashboard-host=127.0.0.1", f"--dashboard-port={dash}", "--include-dashboard=true",
             f"--ray-client-server-port={client}", f"--dashboard-agent-listen-port={agent}",
             "--num-cpus=2", f"--temp-dir={self.temp_dir}", "--disable-usage-stats"],
            env=env, stdout=self.log, stderr=subprocess.STDOUT, start_new_session=True, cwd=self.temp_dir,
        )
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                self.stop()
                raise RuntimeError(f"ray start exited with {self.proc.returncode}:\n{self.log_tail()}")
            try:
                with urllib.request.urlopen(f"{self.address}/api/version", timeout=2) as r:
                    if r.status in (200, 401):
                        break
            except urllib.error.HTTPError as err:
                if err.code == 401:  # token auth on: the server is up
                    break
            except OSError:
                pass
            time.sleep(1)
        else:
            tail = self.log_tail()
            self.stop()
            raise RuntimeError(f"the Ray job server at {self.address} did not come up in 120 s:\n{tail}")

    def log_tail(self, n: int = 4000) -> str:
        self.log.flush()
        try:
            return (Path(self.temp_dir) / "ray-start.log").read_text(errors="replace")[-n:]
        except OSError:
            return ""

    def stop(self) -> None:
        # SIGTERM to `ray start --block` alone: it stops its processes (signalling the whole
        # group at once makes it wait ~40 s for a GCS already gone).
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                pass
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)  # the session this test started
        except (ProcessLookupError, PermissionError):
            pass
        if self.proc.poll() is None:
            self.proc.wait(timeout=10)
        _kill_leftovers(self.temp_dir)  # workers that left the session
        self.log.close()
        shutil.rmtree(self.temp_dir, ignore_errors=True)


@pytest.fixture(scope="module")
def head():
    missing = _dashboard_missing()
    if missing:
        pytest.fail(missing)  # ray[default] is in the test extras: a missing dashboard is a broken install
    h = RayHead()
    try:
        yield h
    finally:
        h.stop()


@pytest.fixture(autouse=True)
def client_env(request, monkeypatch):
    """The client's environment: the head's token in RAY_AUTH_TOKEN, no other Ray settings."""
    for var in [v for v in os.environ if v.startswith("RAY_")]:
        monkeypatch.delenv(var)
    if "head" in request.fixturenames:
        monkeypatch.setenv("RAY_AUTH_TOKEN", request.getfixturevalue("head").token)


def _run(capsys, *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def test_submit_status_logs_until_recall(head, capsys, tmp_path):
    """The whole path of a submission, on a head whose PATH has no rsk-dist console script."""
    code, out, err = _run(capsys, "submit", str(QUICKSTART), *TINY, "--set", f"run.storage_path={tmp_path}",
                          "--address", head.address, "--no-wait")
    assert code == 0, err
    job_id = out.strip()
    assert job_id and "\n" not in job_id, out
    assert job_id in err  # "submitted quickstart as <id> to <address>"

    code, out, err = _run(capsys, "status", job_id, "--address", head.address)
    assert code == 0, err
    assert out.strip() in ("PENDING", "RUNNING", "SUCCEEDED", "FAILED"), out

    code, out, err = _run(capsys, "logs", job_id, "--address", head.address)
    assert code == 0, err

    deadline = time.monotonic() + JOB_TIMEOUT_S
    status = "PENDING"
    while time.monotonic() < deadline:
        code, out, _ = _run(capsys, "status", job_id, "--address", head.address)
        status = out.strip()
        if status in ("SUCCEEDED", "FAILED", "STOPPED"):
            break
        time.sleep(1)
    code, logs, _ = _run(capsys, "logs", job_id, "--address", head.address)
    assert code == 0
    assert status == "SUCCEEDED", f"job ended {status}; its logs:\n{logs[-6000:]}"
    assert "recall@1" in logs, logs[-4000:]
    assert "finished quickstart" in logs

    # --follow on a finished job prints the whole log and returns
    code, followed, _ = _run(capsys, "logs", job_id, "--address", head.address, "--follow")
    assert code == 0 and "recall@1" in followed


def test_bad_config_submits_nothing(head, capsys):
    from ray.job_submission import JobSubmissionClient

    def jobs() -> int:
        return len(JobSubmissionClient(head.address, headers={"Authorization": f"Bearer {head.token}"}).list_jobs())

    before = jobs()
    code, out, err = _run(capsys, "submit", str(QUICKSTART), "--set", "sampler.batch_size=42",
                          "--address", head.address, "--no-wait")
    assert code == 2 and out == ""
    assert "sampler.batch_size" in err and "Traceback" not in err
    assert jobs() == before


def test_unknown_job_is_a_clean_error(head, capsys):
    for command in ("status", "logs", "stop"):
        code, out, err = _run(capsys, command, "raysubmit_doesnotexist", "--address", head.address)
        assert code == 1, (command, out, err)
        assert err.startswith(f"rsk-dist {command}: error:") and "Traceback" not in err


def test_local_paths_are_refused_for_a_remote_cluster(capsys):
    """jobs/omniglot.yaml reads its zips by relative path: on another machine's nodes they would
    resolve in the job's working dir and fail there. Refused before any request is made (the
    TEST-NET address would not answer)."""
    code, out, err = _run(capsys, "submit", str(ROOT / "jobs" / "omniglot.yaml"), "--address", "http://192.0.2.1:8265")
    assert code == 2 and out == "", err
    assert "data.train.url '../shared/data/omniglot/images_background_small1.zip'" in err, err
    assert "data.eval.url" in err and "run.storage_path" in err and "--shared-fs" in err and "rsk-dist ingest" in err
    assert "Traceback" not in err


def test_unreachable_server_is_a_clean_error(capsys):
    (port,) = free_ports(1)
    code, out, err = _run(capsys, "status", "raysubmit_x", "--address", f"http://127.0.0.1:{port}")
    assert code == 1 and "cannot use the Ray job server" in err


def test_submit_then_stop(head, capsys, tmp_path):
    code, out, err = _run(capsys, "submit", str(QUICKSTART), "--set", "train.epochs=50", "--set", "train.log_every=1",
                          "--set", f"run.storage_path={tmp_path}", "--address", head.address, "--no-wait")
    assert code == 0, err
    job_id = out.strip()
    deadline = time.monotonic() + JOB_TIMEOUT_S  # stopped while it trains: its driver gets SIGTERM
    logs = ""
    while "[rsk-dist] epoch" not in logs and time.monotonic() < deadline:
        time.sleep(1)
        _, logs, _ = _run(capsys, "logs", job_id, "--address", head.address)
    assert "[rsk-dist] epoch" in logs, logs[-4000:]
    code, out, err = _run(capsys, "stop", job_id, "--address", head.address)
    assert code == 0, err
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        _, out, _ = _run(capsys, "status", job_id, "--address", head.address)
        if out.strip() in ("STOPPED", "FAILED", "SUCCEEDED"):
            break
        time.sleep(1)
    assert out.strip() == "STOPPED"
    _, logs, _ = _run(capsys, "logs", job_id, "--address", head.address)
    assert "rsk-dist: stopped by SIGTERM" in logs, logs[-4000:]
    assert "SIGTERM received" not in logs and "Traceback" not in logs, logs[-4000:]


def test_token_auth_header(head, capsys, monkeypatch, tmp_path):
    """Token authentication is on: RAY_AUTH_TOKEN on the client becomes the Authorization
    header Ray 2.60's job server checks; none, or a wrong one, is refused cleanly."""
    monkeypatch.setenv("HOME", str(tmp_path))  # no ~/.ray/auth_token to fall back on
    monkeypatch.delenv("RAY_AUTH_TOKEN")
    code, _, err = _run(capsys, "status", "raysubmit_x", "--address", head.address)
    assert code == 1 and "uthentication" in err and "Traceback" not in err, err

    monkeypatch.setenv("RAY_AUTH_TOKEN", "wrong-" + head.token)
    code, _, err = _run(capsys, "status", "raysubmit_x", "--address", head.address)
    assert code == 1 and ("uthentication" in err or "403" in err or "orbidden" in err), err
    assert head.token not in err

    token_file = tmp_path / "token"
    token_file.write_text(head.token + "\n")
    monkeypatch.delenv("RAY_AUTH_TOKEN")
    monkeypatch.setenv("RAY_AUTH_TOKEN_PATH", str(token_file))
    code, _, err = _run(capsys, "status", "raysubmit_x", "--address", head.address)
    assert code == 1, err  # authenticated: now the job is simply unknown
    assert "uthentication" not in err and "orbidden" not in err, err
