"""The GPU acceptance run (issue 20): one script, at most 9 minutes on one H100/H200, that writes
a markdown table and a JSON of what rsk_dist does on a GPU.

- environment: torch, CUDA, NCCL, faiss, Ray and pydantic versions, the device;
- two-pass exactness: the parameter gradient of ``LargeBatchStep`` against one backward through
  the same chunked forward, for the small CNN (float32, TF32 off) and ResNet-50 and ViT-B/16 (bf16 autocast), as the
  relative L2 error over all parameters, with a tolerance derived from the unit roundoff u of
  the arithmetic (float32: u = 6e-8, tolerance 1e-4, room for ~1000 u of reordered sums across
  the layers and kernels chosen per batch size; bf16: u = 3.9e-3, tolerance 3e-2 = 8 u);
- the RS@k loss at N = 65536 with and without SiMix: seconds, peak memory, sub-chunk count (the
  loss's own plan, ``rsk_dist.losses.recall.plan_for_labels``);
- a ResNet-50 two-pass step at 224 px, global batch 4000, bf16, channels_last: images/s,
  seconds per phase, peak memory;
- 2 and 3 processes sharing the GPU over gloo (NCCL refuses two ranks on one GPU) against one
  process (``bench/dist.py``'s workers, the global-batch loss);
- NCCL at world size 1 on every collective call site of rsk_dist (found in the source; the code
  skips collectives at world size 1, so each site's collective is called directly, with the
  dtype, shape and operation the site uses);
- k-NN on 100k x 512: faiss-gpu against the on-device matmul, and what ``plan_search`` chooses;
- JPEG decode throughput (``rsk_dist.data.decode``), one decoder process and one per core;
- a one-GPU Ray job on the digits (jobs/quickstart.yaml with ``scaling.use_gpu``).

A section whose optional package (faiss, Ray, pydantic) is missing says "not installed"; a section
that fails records its error; neither stops the others.

    python bench/gpu.py [--out DIR] [--markdown PATH] [--json PATH] [--smoke]

``--smoke`` runs the same code paths on the CPU at tiny sizes (under 2 minutes on 2 cores):
tests/test_gpu_bench.py runs it, so the script cannot rot without a GPU at hand.
"""
from __future__ import annotations

import argparse
import ast
import importlib
import json
import os
import platform
import socket
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from bench.measure import REPO, machine, measure, table  # noqa: E402

PER_CLASS = 4


@dataclass(frozen=True)
class Sizes:
    """What each section runs at: the GPU run's sizes, or the smoke run's."""

    exact: dict[str, tuple[int, int, int]]  # model: (batch, chunk, image size)
    loss_n: int
    step: tuple[int, int, int]  # ResNet-50 step: (batch, chunk, image size)
    share_n: int
    share_worlds: tuple[int, ...]  # processes on the device
    knn: tuple[int, int]  # gallery rows, dim
    jpegs: int
    ray_steps: int


GPU = Sizes(
    exact={"small_cnn": (256, 64, 28), "resnet50": (64, 16, 224), "vit_b_16": (32, 8, 224)},
    loss_n=65536, step=(4000, 250, 224), share_n=16384, share_worlds=(1, 2, 3), knn=(100_000, 512), jpegs=512, ray_steps=20,
)
SMOKE = Sizes(
    # ResNet-50 at 32 px, no smaller: at 16 px layer4's stride-2 convolution sees a 1x1 map, and
    # the CPU's bf16 weight gradient of that convolution came out NaN in about half the runs of
    # the same inputs (torch 2.14.1, AMD EPYC); at 32 px it did in none of 6.
    exact={"small_cnn": (16, 4, 28), "resnet50": (8, 4, 32), "vit_b_16": (4, 2, 32)},
    loss_n=256, step=(8, 4, 16), share_n=256, share_worlds=(1, 2), knn=(2000, 64), jpegs=16, ray_steps=2,
)
# Precision of each exactness case, and its tolerance on the relative L2 gradient error (above).
EXACT_DTYPE = {"small_cnn": None, "resnet50": torch.bfloat16, "vit_b_16": torch.bfloat16}
TOLERANCE = {None: 1e-4, torch.bfloat16: 3e-2}
COLLECTIVES = {
    "all_reduce", "all_gather", "all_gather_into_tensor", "all_gather_single", "reduce_scatter",
    "reduce_scatter_tensor", "reduce_scatter_single", "broadcast", "barrier", "all_to_all",
    "all_to_all_single", "reduce", "gather", "scatter", "all_gather_object", "broadcast_object_list",
}


class NotInstalled(Exception):
    """An optional package a section needs is missing."""


def need(module: str):
    try:
        return importlib.import_module(module)
    except ImportError as err:
        raise NotInstalled(f"{module} not installed") from err


def version(module: str) -> str:
    try:
        return getattr(importlib.import_module(module), "__version__", "installed")
    except ImportError:
        return "not installed"


def sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def peak_mb(device: str) -> str:
    return f"{torch.cuda.max_memory_allocated() / 2**20:.0f}" if device == "cuda" else "-"


def labels_for(n: int, device: str) -> torch.Tensor:
    return torch.arange(n // PER_CLASS, device=device).repeat_interleave(PER_CLASS)


# --------------------------------------------------------------------------- sections


def environment(device: str, sizes: Sizes) -> dict:
    nccl = "not available"
    if torch.cuda.is_available() and hasattr(torch.cuda, "nccl"):
        v = torch.cuda.nccl.version()
        nccl = ".".join(map(str, v)) if isinstance(v, tuple) else str(v)
    faiss = version("faiss")
    if faiss != "not installed":
        faiss += f" ({importlib.import_module('faiss').get_num_gpus()} GPUs visible to faiss)"
    return {
        "header": ["item", "value"],
        "rows": [
            ["device", torch.cuda.get_device_name() if device == "cuda" else "cpu (smoke)"],
            ["machine", machine()], ["python", platform.python_version()], ["torch", torch.__version__],
            ["CUDA (torch build)", str(torch.version.cuda)], ["NCCL", nccl], ["faiss", faiss],
            ["ray", version("ray")], ["pydantic", version("pydantic")],
        ],
    }


def _gradients(model: torch.nn.Module) -> torch.Tensor:
    return torch.cat([p.grad.reshape(-1).double() for p in model.parameters() if p.grad is not None])


def exactness(device: str, sizes: Sizes) -> dict:
    from rsk_dist.engine import LargeBatchStep
    from rsk_dist.losses import RecallAtKSurrogate
    from rsk_dist.models import build_model

    # float32 means float32: TF32 would round inputs to 10 bits.
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    rows = []
    for name, (batch, chunk, size) in sizes.exact.items():
        dtype = EXACT_DTYPE[name]
        torch.manual_seed(0)
        channels = 1 if name == "small_cnn" else 3
        kwargs = {"image_size": size} if name.startswith("vit") else {}
        model = build_model(name, dim=128, in_channels=channels, **kwargs).to(device)
        loss = RecallAtKSurrogate(tau2=0.01)
        images = torch.rand(batch, channels, size, size, device=device)
        labels = labels_for(batch, device)
        model.zero_grad(set_to_none=True)
        # The claim is that the two passes equal one backward through the same chunked forward:
        # a whole-batch forward would run other bf16 kernels, whose rounding the sharp sigmoid
        # of RS@k (1/tau2 = 100) amplifies into the gradient far beyond the tolerance.
        with torch.autocast(device, dtype=dtype or torch.bfloat16, enabled=dtype is not None):
            embeddings = torch.cat([model(part) for part in images.split(chunk)])
        loss(embeddings.float(), labels).backward()
        full = _gradients(model)
        model.zero_grad(set_to_none=True)
        LargeBatchStep(model, loss, chunk, dtype).step(images, labels)
        two_pass = _gradients(model)
        error = float((two_pass - full).norm() / full.norm())
        tolerance = TOLERANCE[dtype]
        rows.append([name, "bf16" if dtype else "float32", f"{batch} in chunks of {chunk}, {size} px",
                     f"{error:.2e}", f"{tolerance:.0e}", "ok" if error <= tolerance else "FAILS"])
        del model
    return {"header": ["model", "precision", "batch", "relative L2 error of the gradient", "tolerance", "within"],
            "rows": rows}


def sub_chunk_count(labels: torch.Tensor, device: torch.device) -> int:
    """Sub-chunks the loss plans for these labels (SiMix's virtual samples included) on ``device``."""
    from rsk_dist.losses.recall import loss_budget, plan_for_labels

    return sum(len(subs) for _, _, subs in plan_for_labels(labels, loss_budget(device)))


def loss_at_scale(device: str, sizes: Sizes) -> dict:
    from rsk_dist.losses import RecallAtKSurrogate
    from rsk_dist.losses.simix import mixing

    n = sizes.loss_n
    torch.manual_seed(0)
    labels = labels_for(n, device)
    rows = []
    for use_simix in (False, True):
        emb = F.normalize(torch.randn(n, 512, device=device), dim=1).requires_grad_()
        loss = RecallAtKSurrogate(simix=use_simix)

        def run() -> None:
            emb.grad = None
            loss(emb, labels, generator=torch.Generator().manual_seed(0)).backward()

        result = measure(run, device, repeats=1)
        all_labels = mixing(labels, torch.Generator().manual_seed(0)).labels if use_simix else labels
        rows.append([str(n), "yes" if use_simix else "no", str(all_labels.numel()), f"{result['seconds']:.2f}",
                     f"{result['peak_growth_mb']:.0f}", str(sub_chunk_count(all_labels, emb.device))])
        del emb
    return {"header": ["N", "SiMix", "samples (virtual included)", "forward+backward s", "peak memory growth MB",
                       "sub-chunks"], "rows": rows}


def resnet50_step(device: str, sizes: Sizes) -> dict:
    from rsk_dist.engine import LargeBatchStep
    from rsk_dist.losses import RecallAtKSurrogate
    from rsk_dist.models import build_model

    batch, chunk, size = sizes.step
    torch.manual_seed(0)
    model = build_model("resnet50", dim=512, channels_last=True).to(device)
    step = LargeBatchStep(model, RecallAtKSurrogate(simix=True), chunk, torch.bfloat16)
    images = torch.rand(batch, 3, size, size, device=device)
    labels = labels_for(batch, device)
    optimizer = torch.optim.SGD(model.parameters(), lr=1e-4)
    timings: list[dict[str, float]] = []

    def run() -> None:
        model.zero_grad(set_to_none=True)
        timings.append(step.step(images, labels, torch.Generator().manual_seed(0)).timings)
        step.optimizer_step(optimizer)

    result = measure(run, device, repeats=2)
    best = min(timings[1:], key=lambda t: sum(t.values()))
    return {"header": ["batch", "chunk", "px", "images/s", "embed s", "loss s", "backward s", "step s", "peak MB"],
            "rows": [[str(batch), str(chunk), str(size), f"{batch / result['seconds']:.0f}",
                      *(f"{best[k]:.2f}" for k in ("embed_s", "loss_s", "backward_s")),
                      f"{result['seconds']:.2f}", f"{result['peak_growth_mb']:.0f}"]],
            "note": "bf16 autocast, channels_last, frozen BatchNorm, RS@k + SiMix, SGD; fastest of 2 steps after one warm-up"}


def shared_gpu(device: str, sizes: Sizes) -> dict:
    from bench.dist import run_world

    rows = []
    for world in sizes.share_worlds:
        summary = run_world(world, sizes.share_n, 512, 2, max(1, os.cpu_count() // world), device)
        for mode, s in summary.items():
            rows.append([str(world), mode if world > 1 else "either (plain loss)", f"{s['loss_s']:.3f}",
                         f"{s['comm_s']:.3f}", f"{s['bytes_received'] / 2**20:.1f}"])
    return {"header": ["processes", "mode", "loss s (per process)", "comm s", "MB received per process"],
            "rows": rows, "note": f"RS@k + SiMix, N = {sizes.share_n}, d = 512, gloo, every process on the same {device}"}


def collective_call_sites() -> list[tuple[str, int, str, str]]:
    """(file, line, function, collective) of every torch.distributed collective called in rsk_dist."""
    sites = []
    for path in sorted((REPO / "rsk_dist").rglob("*.py")):
        module = ".".join(path.relative_to(REPO).with_suffix("").parts)
        tree = ast.parse(path.read_text())

        def visit(node: ast.AST, scope: list[str]) -> None:
            for child in ast.iter_child_nodes(node):
                if isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
                    visit(child, [*scope, child.name])
                    continue
                if isinstance(child, ast.Call):
                    f = child.func
                    name = (f.attr if isinstance(f, ast.Attribute) and isinstance(f.value, ast.Name) and f.value.id == "dist"
                            else f.id if isinstance(f, ast.Name) and f.id in ("_all_gather", "_reduce_scatter") else None)
                    if name in COLLECTIVES or name in ("_all_gather", "_reduce_scatter"):
                        sites.append((str(path.relative_to(REPO)), child.lineno, ".".join([module, *scope]), name))
                visit(child, scope)

        visit(tree, [])
    return sites


def _exercises(device: str) -> dict[str, Callable[[], None]]:
    """For each function holding collectives, its collectives called with what it passes them;
    each checks the world-size-1 result (the input itself)."""
    import torch.distributed as dist

    from rsk_dist.distributed import ShardLayout, all_gather_rows

    emb = torch.randn(6, 8, device=device)
    labels = torch.arange(6, device=device)

    def same(a: torch.Tensor, b: torch.Tensor) -> None:
        if not torch.equal(a, b):
            raise AssertionError("a world-size-1 collective changed its input")

    def gather() -> None:  # also ShardLayout's row-count exchange (int64) and gather
        layout = ShardLayout(len(emb), emb.device)
        same(layout.gather(emb), emb)
        same(layout.gather(labels), labels)
        same(all_gather_rows(emb), emb)

    def all_reduce_value() -> None:  # GlobalBatchLoss: the sharded loss value, a 0-d float32
        value = emb.sum()
        dist.all_reduce(out := value.clone())
        same(out, value)

    def gradients() -> None:  # sum_gradients: every parameter gradient, flattened into one float32
        model = torch.nn.Linear(8, 4).to(device)
        model(emb).sum().backward()
        flat = torch.cat([p.grad.reshape(-1) for p in model.parameters()])
        dist.all_reduce(out := flat.clone())
        same(out, flat)

    def flag() -> None:  # CheckpointSchedule.preempted: a float flag, MAX
        out = torch.tensor([1.0], device=device)
        dist.all_reduce(out, op=dist.ReduceOp.MAX)
        same(out, torch.tensor([1.0], device=device))

    return {
        "rsk_dist.distributed.all_gather_rows": gather,
        "rsk_dist.distributed.ShardLayout.sum_own_rows": lambda: same(ShardLayout(len(emb), emb.device).sum_own_rows(emb), emb),
        "rsk_dist.distributed.GlobalBatchLoss.forward": all_reduce_value,
        "rsk_dist.distributed.sum_gradients": gradients,
        "rsk_dist.preemption.CheckpointSchedule.preempted": flag,
    }


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def collectives(device: str, sizes: Sizes) -> dict:
    import torch.distributed as dist

    backend = "nccl" if device == "cuda" else "gloo"
    dist.init_process_group(backend, init_method=f"tcp://127.0.0.1:{free_port()}", rank=0, world_size=1)
    try:
        exercises, rows = _exercises(device), []
        for file, line, function, op in collective_call_sites():
            run = exercises.get(function)
            if run is None:
                result = "NOT EXERCISED: add it to bench/gpu.py"
            else:
                try:
                    run()
                    sync(device)
                    result = "ok"
                except Exception as err:  # noqa: BLE001 - the row reports it
                    result = f"error: {type(err).__name__}: {str(err)[:100]}"
            rows.append([f"{file}:{line}", function.removeprefix("rsk_dist."), op, result])
    finally:
        dist.destroy_process_group()
    return {"header": ["call site", "function", "collective", f"{backend}, world size 1"], "rows": rows}


def knn_backends(device: str, sizes: Sizes) -> dict:
    from rsk_dist.metrics import _has_faiss_gpu, free_device_bytes, knn, plan_search

    faiss = need("faiss")
    n, dim = sizes.knn
    k = 16
    torch.manual_seed(0)
    emb = F.normalize(torch.randn(n, dim, device=device), dim=1)
    found, rows = {}, []
    gpu_index = device == "cuda" and _has_faiss_gpu(faiss)
    for name, use_faiss in (("matmul", False), ("faiss-gpu" if gpu_index else "faiss (CPU index)", True)):
        def run(use_faiss: bool = use_faiss) -> None:
            found[use_faiss] = knn(emb, emb, k, exclude_self=True, use_faiss=use_faiss)

        result = measure(run, device, repeats=1)
        rows.append([name, f"{result['seconds']:.2f}", f"{result['peak_growth_mb']:.0f}"])
    same = float((found[True][1] == found[False][1]).all(1).float().mean())
    auto = plan_search(device, n, k, 4096, free_device_bytes(emb.device), None, True, gpu_index)
    return {"header": ["backend", "seconds", "peak memory growth MB"], "rows": rows,
            "note": f"{n} x {dim} unit vectors, k = {k}, self excluded; queries whose {k} neighbours agree: "
                    f"{100 * same:.2f}%; plan_search chooses {auto.backend} (chunk {auto.chunk_size})"}


def jpeg_decode(device: str, sizes: Sizes) -> dict:
    from bench.io import generate
    from rsk_dist.data.decode import Augment, Decoder

    rows = []
    with tempfile.TemporaryDirectory() as root:
        paths = sorted(generate(Path(root), sizes.jpegs).rglob("*.jpg"))
        items = [(i, i, p.read_bytes()) for i, p in enumerate(paths)]
        augment = Augment(in_channels=3, image_size=224, train=True, seed=0)
        for processes in sorted({1, len(os.sched_getaffinity(0))}):
            decoder = Decoder(processes)
            try:
                for future in decoder.submit(augment, 0, items[: processes * 8]):  # starts the processes
                    future.result()
                t0 = time.perf_counter()
                for future in decoder.submit(augment, 1, items):
                    future.result()
                seconds = time.perf_counter() - t0
            finally:
                decoder.shutdown()
            rows.append([str(processes), str(len(items)), f"{len(items) / seconds:.0f}"])
    return {"header": ["decoder processes", "JPEGs (500x375)", "images/s"], "rows": rows,
            "note": "random resized crop to 224 and flip, uint8 out"}


def ray_job(device: str, sizes: Sizes) -> dict:
    need("ray")
    need("pydantic")
    import ray

    from rsk_dist.config import load_config
    from rsk_dist.train import fit

    if device == "cuda":
        torch.cuda.empty_cache()  # the job's worker is another process on this GPU
    with tempfile.TemporaryDirectory() as storage:
        config = load_config(str(REPO / "jobs" / "quickstart.yaml"), [
            f"scaling.use_gpu={str(device == 'cuda').lower()}", "train.epochs=1",
            f"train.steps_per_epoch={sizes.ray_steps}", f"run.storage_path=file://{storage}", "run.name=gpu-bench",
        ])
        t0 = time.perf_counter()
        try:
            metrics = fit(config)
        finally:
            ray.shutdown()
        seconds = time.perf_counter() - t0
    return {"header": ["use_gpu", "steps", "seconds (cluster start included)", "Recall@1 (digits test)"],
            "rows": [[str(config.scaling.use_gpu), str(sizes.ray_steps), f"{seconds:.0f}", f"{metrics['recall@1']:.3f}"]]}


SECTIONS: dict[str, tuple[str, Callable[[str, Sizes], dict]]] = {
    "environment": ("Environment", environment),
    "exactness": ("Two-pass step against one full backward", exactness),
    "loss": ("RS@k loss at scale", loss_at_scale),
    "resnet50_step": ("ResNet-50 two-pass step", resnet50_step),
    "shared_gpu": ("Processes sharing one device over gloo", shared_gpu),
    "collectives": ("Every collective call site at world size 1", collectives),
    "knn": ("k-NN backends", knn_backends),
    "jpeg_decode": ("JPEG decode throughput", jpeg_decode),
    "ray_job": ("One-device Ray job on the digits", ray_job),
}


def run_all(device: str, sizes: Sizes, only: list[str]) -> dict:
    results = {}
    for key in only:
        title, fn = SECTIONS[key]
        t0 = time.perf_counter()
        if device == "cuda":
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
        try:
            section = fn(device, sizes)
        except NotInstalled as err:
            section = {"status": str(err)}
        except Exception as err:  # noqa: BLE001 - one failing section must not hide the others
            section = {"status": f"error: {type(err).__name__}: {err}", "traceback": traceback.format_exc()[-3000:]}
        section.setdefault("status", "ok")
        section.update(title=title, seconds=round(time.perf_counter() - t0, 2))
        results[key] = section
        print(f"done {key} in {section['seconds']:.0f}s: {section['status']}", file=sys.stderr, flush=True)
    return results


def markdown(results: dict, device: str, smoke: bool, started: str, total_s: float) -> str:
    kind = "smoke run on the CPU (tiny sizes; figures mean nothing)" if smoke else f"on {device}"
    out = [f"# bench/gpu.py, {kind}", "", f"{started}, {total_s:.0f} s in all: {machine()}", ""]
    for section in results.values():
        out += [f"## {section['title']} ({section['seconds']:.0f} s)", ""]
        if section["status"] != "ok":
            out += [section["status"], ""]
            continue
        out += [table(section["header"], section["rows"]), ""]
        if section.get("note"):
            out += [section["note"], ""]
    return "\n".join(out)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--smoke", action="store_true", help="the same code paths on the CPU at tiny sizes")
    parser.add_argument("--out", type=Path, default=Path("."), help="folder of gpu-bench.md and gpu-bench.json")
    parser.add_argument("--markdown", type=Path, help="where the table goes (default OUT/gpu-bench.md)")
    parser.add_argument("--json", type=Path, help="where the JSON goes (default OUT/gpu-bench.json)")
    parser.add_argument("--sections", nargs="+", choices=list(SECTIONS), default=list(SECTIONS))
    args = parser.parse_args()
    device = "cpu" if args.smoke else "cuda"
    if device == "cuda" and not torch.cuda.is_available():
        parser.error("no CUDA device: run on a GPU machine, or --smoke on the CPU")
    started = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    t0 = time.perf_counter()
    results = run_all(device, SMOKE if args.smoke else GPU, args.sections)
    total = time.perf_counter() - t0
    args.out.mkdir(parents=True, exist_ok=True)
    md_path, json_path = args.markdown or args.out / "gpu-bench.md", args.json or args.out / "gpu-bench.json"
    md_path.write_text(markdown(results, device, args.smoke, started, total) + "\n")
    json_path.write_text(json.dumps({"device": device, "smoke": args.smoke, "started": started, "seconds": round(total, 1),
                                     "machine": machine(), "sections": results}, indent=2) + "\n")
    print(f"wrote {md_path} and {json_path} ({total:.0f} s)", file=sys.stderr)


if __name__ == "__main__":
    main()
