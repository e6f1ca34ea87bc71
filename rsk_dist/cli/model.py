"""Model commands: ``eval`` a checkpoint, ``export`` its embedding model, ``export-index`` a gallery."""
from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

from rsk_dist.cli.common import (
    CLIError, importable, open_out, parse_data_spec, print_metrics, redact, url_arg, with_data,
)


def cmd_eval(args: argparse.Namespace) -> int:
    data = parse_data_spec(args.data, args.exclude_class)
    from rsk_dist.train import evaluate_checkpoint

    queries = parse_data_spec(args.queries, args.exclude_class) if args.queries else None
    metrics = evaluate_checkpoint(args.checkpoint_url, data=data, image_size=args.image_size, ks=tuple(args.k),
                                  protocol=args.protocol, queries=queries, ground_truth=args.ground_truth,
                                  gallery_model=args.gallery_model)
    print_metrics(dict(metrics), redact(f"{args.checkpoint_url} on {args.data}:"))
    return 0


def _example_input(config, image_size: int | None):
    import torch

    size = image_size or config.data.image_size
    return torch.zeros(2, config.model.in_channels, size, size)


def cmd_export(args: argparse.Namespace) -> int:
    import io

    import torch

    if args.format == "onnx":
        missing = [m for m in ("onnx", "onnxscript") if not importable(m)]
        if missing:
            raise CLIError(f"ONNX export needs {' and '.join(missing)}: pip install onnx onnxscript")
    from rsk_dist.checkpoint import load_model

    model, config = load_model(args.checkpoint_url)
    example = _example_input(config, args.image_size)
    buffer = io.BytesIO()
    with torch.no_grad():
        if args.format == "torchscript":
            traced = torch.jit.trace(model, example)
            torch.jit.save(traced, buffer)
        else:
            with tempfile.TemporaryDirectory() as tmp:
                path = Path(tmp) / "model.onnx"
                torch.onnx.export(
                    model, (example,), str(path), input_names=["images"], output_names=["embeddings"],
                    dynamic_shapes={"images": {0: torch.export.Dim("batch")}}, external_data=False,
                )
                buffer.write(path.read_bytes())
    with open_out(args.out) as f:
        f.write(buffer.getvalue())
    print(
        f"exported {config.model.name} ({config.model.dim}-d, input N x {example.shape[1]} x "
        f"{example.shape[2]} x {example.shape[3]}) as {args.format} to {redact(args.out)}"
    )
    return 0


def cmd_export_index(args: argparse.Namespace) -> int:
    if not importable("faiss"):
        raise CLIError("export-index needs faiss: pip install faiss-cpu (or faiss-gpu-cu12 on CUDA 12 machines)")
    import faiss
    import numpy as np

    from rsk_dist.checkpoint import load_model
    from rsk_dist.train import embed_with_checkpoint

    spec = parse_data_spec(args.data, args.exclude_class)
    model, config = load_model(args.checkpoint_url)
    if args.teacher:
        if config.teacher is None:
            raise CLIError(f"{redact(args.checkpoint_url)} was trained without a teacher: index with the teacher's own checkpoint")
        from rsk_dist.teacher import load_teacher

        model = load_teacher(config.teacher)  # the database side of asymmetric retrieval
    emb, labels = embed_with_checkpoint(model, config, spec, args.image_size)
    emb = np.ascontiguousarray(emb.cpu().numpy(), dtype=np.float32)
    index = faiss.IndexIDMap(faiss.IndexFlatIP(emb.shape[1]))  # unit vectors: inner product = cosine
    index.add_with_ids(emb, np.arange(len(emb), dtype=np.int64))
    blob = faiss.serialize_index(index)
    with open_out(args.out) as f:
        f.write(blob.tobytes())
    with open_out(args.out + ".labels.npy") as f:
        np.save(f, labels.cpu().numpy())
    print(f"indexed {len(emb)} gallery embeddings ({emb.shape[1]}-d, inner product) into {redact(args.out)}")
    print(f"labels (row i = id i) in {redact(args.out)}.labels.npy")
    return 0


def add_commands(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("eval", help="retrieval metrics of a checkpoint on a data set")
    p.add_argument("checkpoint_url", metavar="CHECKPOINT_URL", type=url_arg)
    with_data(p)
    p.add_argument("--k", type=int, nargs="+", default=[1, 2, 4, 8], metavar="K", help="Recall@k values")
    p.add_argument("--protocol", choices=["all", "vehicleid", "revisited"], default="all",
                   help="all: every image queries the others; vehicleid: one gallery image per identity; "
                        "revisited: --queries against the --data gallery, Revisited Oxford/Paris mAP")
    p.add_argument("--queries", metavar="KIND:URL[:SPLIT]", type=url_arg, help="query images for --protocol revisited")
    p.add_argument("--ground-truth", metavar="URL", type=url_arg, help="ground-truth JSON for --protocol revisited")
    p.add_argument("--gallery-model", metavar="CHECKPOINT_URL", type=url_arg,
                   help="a teacher checkpoint that embeds the gallery: metrics symmetric, asymmetric_ and teacher_")
    p.set_defaults(func=cmd_eval)

    p = sub.add_parser("export", help="export a checkpoint's embedding model")
    p.add_argument("checkpoint_url", metavar="CHECKPOINT_URL", type=url_arg)
    p.add_argument("out", metavar="OUT", type=url_arg, help="output file (local path or fsspec URL)")
    p.add_argument("--format", required=True, choices=("torchscript", "onnx"))
    p.add_argument("--image-size", type=int, default=None, metavar="N",
                   help="example input size for tracing (default: the checkpoint's data.image_size)")
    p.set_defaults(func=cmd_export)

    p = sub.add_parser("export-index", help="a faiss index of a gallery's embeddings")
    p.add_argument("checkpoint_url", metavar="CHECKPOINT_URL", type=url_arg)
    with_data(p)
    p.add_argument("out", metavar="OUT", type=url_arg, help="output index file (local path or fsspec URL)")
    p.add_argument("--teacher", action="store_true",
                   help="embed the gallery with the checkpoint's teacher (asymmetric training), not its own model")
    p.set_defaults(func=cmd_export_index)
