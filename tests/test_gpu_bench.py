"""bench/gpu.py --smoke: the GPU acceptance script's code paths on the CPU at tiny sizes, so that
it cannot rot while no GPU is at hand (issue 20, acceptance 4)."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from bench.gpu import SECTIONS, collective_call_sites  # noqa: E402


def test_gpu_bench_smoke_writes_every_section(tmp_path):
    md, js = tmp_path / "table.md", tmp_path / "out" / "result.json"
    run = subprocess.run([sys.executable, "bench/gpu.py", "--smoke", "--out", str(tmp_path / "out"), "--markdown", str(md),
                          "--json", str(js)], cwd=REPO, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    result = json.loads(js.read_text())
    assert result["smoke"] and result["device"] == "cpu"
    sections = result["sections"]
    assert list(sections) == list(SECTIONS)
    failed = {k: s["status"] for k, s in sections.items() if s["status"] != "ok"}
    assert not failed, failed  # the CI venv has faiss-cpu, Ray and pydantic: nothing is "not installed"
    text = md.read_text()
    for section in sections.values():
        assert f"## {section['title']}" in text
        assert all(len(row) == len(section["header"]) for row in section["rows"]), section["title"]
    # The float32 two-pass step matches one full backward on the CPU, bf16 within its tolerance.
    assert [row[-1] for row in sections["exactness"]["rows"]] == ["ok", "ok", "ok"]
    # Every collective call site was exercised (gloo here, NCCL on a GPU), none left out.
    collectives = sections["collectives"]["rows"]
    assert len(collectives) == len(collective_call_sites()) >= 5
    assert {row[-1] for row in collectives} == {"ok"}, collectives
    # SiMix adds virtual samples, and the loss plans at least one sub-chunk for each case.
    (_, _, plain, *_, chunks0), (_, _, mixed, *_, chunks1) = sections["loss"]["rows"]
    assert int(mixed) > int(plain) == 256 and int(chunks0) >= 1 and int(chunks1) >= 1
    assert float(sections["ray_job"]["rows"][0][-1]) > 0  # the job trained and evaluated


def test_collective_call_sites_are_found():
    sites = collective_call_sites()
    functions = {function for _, _, function, _ in sites}
    assert {"rsk_dist.distributed.all_gather_rows", "rsk_dist.distributed.ShardLayout.sum_own_rows",
            "rsk_dist.distributed.sum_gradients", "rsk_dist.preemption.CheckpointSchedule.preempted"} <= functions
    assert all(line > 0 and file.endswith(".py") for file, line, _, _ in sites)
