"""Deadlines on a batch (issue 23, findings 8 and 9): a stopped decoder process is killed and
started again, then a clear error if it misses again; a store that hangs or trickles is given
up on after ``data.read_deadline_s`` with a clear error, not after 16 x 60 s, or never."""
from __future__ import annotations

import contextlib
import os
import signal
import threading

import pytest
import torch

from rsk_dist.data.decode import Decoder, DecoderDied
from rsk_dist.data.shards import ShardReadError, ShardSource
from rsk_dist.ingest import ingest
from tests.images import StopsItsDecoder
from tests.s3proxy import Fault, S3Proxy
from tests.test_ingest import make_folders


def _in_thread(fn, limit_s: float = 120.0):
    """``fn()``'s result or exception; fails the test (instead of hanging it) past ``limit_s``."""
    out: dict = {}

    def run() -> None:
        try:
            out["value"] = fn()
        except BaseException as err:  # noqa: BLE001 - handed to the test
            out["error"] = err

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    thread.join(limit_s)
    assert not thread.is_alive(), f"still blocked after {limit_s} s"
    return out


def test_a_stopped_decoder_is_killed_and_started_again(tmp_path):
    make_folders(tmp_path / "src")
    url = str(tmp_path / "ds")
    ingest(str(tmp_path / "src"), url, "folders")
    src = ShardSource(url, "train", image_size=16, train=False, decoders=1, decode_deadline_s=2)
    idx = torch.arange(len(src))
    images, _ = src(idx)
    (stopped,) = Decoder.shared(1).pids
    os.kill(stopped, signal.SIGSTOP)
    try:
        out = _in_thread(lambda: src(idx))
    finally:
        with contextlib.suppress(ProcessLookupError):  # gone once the source has killed it
            os.kill(stopped, signal.SIGKILL)
    assert "error" not in out, out.get("error")
    assert torch.equal(out["value"][0], images)  # the batch decoded again, by a new process
    assert stopped not in Decoder.shared(1).pids and len(Decoder.shared(1).pids) == 1
    src.close()


def test_a_decoder_that_misses_its_deadline_again_is_a_clear_error():
    decoder = Decoder(1)
    for _ in range(2):  # each time the process is killed, and a new one started for the next chunk
        future = decoder.submit(StopsItsDecoder(), 0, [(0, 0, b"")], deadline_s=2)[0]
        with pytest.raises(DecoderDied, match="did not answer within 2 s.*killed and is started again"):
            future.result(timeout=120)
    decoder.shutdown()
    assert decoder.pids == []


@pytest.mark.parametrize("fault", [Fault("hang"), Fault("trickle", every_s=0.5)], ids=["hung", "trickling"])
def test_reads_from_a_hung_or_trickling_store_end_at_the_deadline(s3, tmp_path, monkeypatch, fault):
    make_folders(tmp_path / "src")
    url = s3.url()
    ingest(str(tmp_path / "src"), url, "folders")
    shard_reads = lambda method, path: fault if method == "GET" and "/shards/" in path and ".bin" in path else None  # noqa: E731
    with S3Proxy(s3.endpoint, shard_reads) as proxy:
        monkeypatch.setenv("AWS_ENDPOINT_URL", proxy.endpoint)
        src = ShardSource(url, "train", image_size=16, train=False, read_deadline_s=3)
        out = _in_thread(lambda: src(torch.arange(len(src))))
        assert proxy.hit.is_set()
        src.close()
    err = out.get("error")
    assert isinstance(err, ShardReadError), out
    assert "data.read_deadline_s = 3 s" in str(err) and "hung or sends too slowly" in str(err)
