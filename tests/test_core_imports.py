"""The core runs with torch alone: no Ray, pydantic, faiss or storage libraries (the GPU
machines the benchmarks run on have none of them)."""
import subprocess
import sys

CODE = """
import sys
for name in ("ray", "pydantic", "faiss", "fsspec", "s3fs", "yaml", "pyarrow", "pytorch_metric_learning"):
    sys.modules[name] = None  # any import of them now raises ImportError
import torch
import torch.nn.functional as F
from rsk_dist.data.sources import MemorySource
from rsk_dist.distributed import GlobalBatchLoss
from rsk_dist.engine import LargeBatchStep
from rsk_dist.evaluate import evaluate
from rsk_dist.losses import RecallAtKSurrogate
from rsk_dist.loop import train_step
from rsk_dist.models import build_model
from rsk_dist.sampler import ClassBalancedSampler

torch.manual_seed(0)
labels = torch.arange(8).repeat_interleave(4)
images = torch.rand(32, 1, 12, 12)
model = build_model("small_cnn", dim=16, in_channels=1)
step = LargeBatchStep(model, GlobalBatchLoss(RecallAtKSurrogate(simix=True, tau2=0.05)), chunk_size=8)
optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
source = MemorySource(images, labels)
metrics = train_step(step, optimizer, ClassBalancedSampler(labels, 16), source, 0, 0)
print("loss", metrics["loss"], "recall@1", evaluate(model, source)["recall@1"])
"""


def test_core_trains_and_evaluates_without_service_packages():
    result = subprocess.run([sys.executable, "-c", CODE], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
    loss = float(result.stdout.split("loss")[1].split()[0])
    assert 0 < loss <= 1
