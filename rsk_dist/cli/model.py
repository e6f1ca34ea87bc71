"""Model commands: ``eval`` a checkpoint, ``export`` its embedding model with its preprocessing
record, ``export-index`` a gallery, ``embed`` images and ``search`` a gallery (:mod:`rsk_dist.index`)."""
from __future__ import annotations

import argparse
import tempfile
import warnings
from pathlib import Path

from rsk_dist.cli.common import (
    CLIError, importable, open_out, parse_data_spec, print_metrics, redact, url_arg, with_data,
)


DATA_KINDS = ("shards", "zip", "digits")


def _device(args: argparse.Namespace):
    from rsk_dist.index import resolve_device

    return resolve_device(args.device)


def cmd_eval(args: argparse.Namespace) -> int:
    data = parse_data_spec(args.data, args.exclude_class)
    from rsk_dist.train import evaluate_checkpoint

    queries = parse_data_spec(args.queries, args.exclude_class) if args.queries else None
    metrics = evaluate_checkpoint(args.checkpoint_url, data=data, image_size=args.image_size, ks=tuple(args.k),
                                  protocol=args.protocol, queries=queries, ground_truth=args.ground_truth,
                                  gallery_model=args.gallery_model, device=_device(args))
    print_metrics(dict(metrics), redact(f"{args.checkpoint_url} on {args.data}:"))
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    import io

    import torch

    if args.format == "onnx":
        missing = [m for m in ("onnx", "onnxscript") if not importable(m)]
        if missing:
            raise CLIError(f"ONNX export needs {' and '.join(missing)}: pip install onnx onnxscript")
    from rsk_dist.index import JIT_DEPRECATED, RECORD_SUFFIX, EmbeddingModel

    from rsk_dist.storage import filesystem

    fs, path = filesystem(args.checkpoint_url)
    if fs.isfile(path):  # an export, or no model at all: either way not what export reads
        raise CLIError(
            f"{redact(args.checkpoint_url)} is a file: export takes a checkpoint directory (a run's best/ or one "
            "of its checkpoint_epoch_*)"
        )
    model = EmbeddingModel(args.checkpoint_url, "cpu", args.image_size)
    pre = model.preprocess
    example = torch.zeros(2, model.config.model.in_channels, pre.size, pre.size)
    buffer = io.BytesIO()
    with torch.no_grad(), warnings.catch_warnings():
        warnings.filterwarnings("ignore", JIT_DEPRECATED, FutureWarning)  # the user chose TorchScript
        dim = model.module(example).shape[-1]  # model.dim, or a teacher's through a learned map
        if args.format == "torchscript":
            traced = torch.jit.trace(model.module, example)
            torch.jit.save(traced, buffer)
        else:
            with tempfile.TemporaryDirectory() as tmp:
                path = Path(tmp) / "model.onnx"
                torch.onnx.export(
                    model.module, (example,), str(path), input_names=["images"], output_names=["embeddings"],
                    dynamic_shapes={"images": {0: torch.export.Dim("batch")}}, external_data=False,
                )
                buffer.write(path.read_bytes())
    with open_out(args.out) as f:
        f.write(buffer.getvalue())
    with open_out(args.out + RECORD_SUFFIX) as f:
        f.write(pre.to_json().encode())
    print(
        f"exported {model.config.model.name} ({dim}-d, input N x {example.shape[1]} x "
        f"{example.shape[2]} x {example.shape[3]}) as {args.format} to {redact(args.out)}"
    )
    print(f"its preprocessing (README, 'Use your model') in {redact(args.out)}{RECORD_SUFFIX}")
    return 0


def _inputs(values: list[str], exclude: list[str]) -> list:
    """Data specs (``KIND:...``) as sources; anything else is an image, folder or zip path."""
    return [parse_data_spec(v, exclude) if v.partition(":")[0] in DATA_KINDS and not Path(v).exists() else v
            for v in values]


def cmd_embed(args: argparse.Namespace) -> int:
    from rsk_dist.index import EmbeddingModel

    emb = EmbeddingModel(args.model_url, _device(args), args.image_size).embed(_inputs(args.images, args.exclude_class))
    with open_out(args.out) as f:
        emb.save(f)
    print(f"embedded {len(emb)} images ({emb.vectors.shape[1]}-d) with {redact(args.model_url)} into {redact(args.out)}")
    return 0


def cmd_export_index(args: argparse.Namespace) -> int:
    if not importable("faiss"):
        raise CLIError("export-index needs faiss: pip install faiss-cpu (or faiss-gpu-cu12 on CUDA 12 machines)")
    import json

    import faiss
    import numpy as np

    from rsk_dist.index import META_SUFFIX, EmbeddingModel

    spec = parse_data_spec(args.data, args.exclude_class)
    emb = EmbeddingModel(args.checkpoint_url, _device(args), args.image_size).embed([spec])
    vectors = np.ascontiguousarray(emb.vectors, dtype=np.float32)
    index = faiss.IndexIDMap(faiss.IndexFlatIP(vectors.shape[1]))  # unit vectors: inner product = cosine
    index.add_with_ids(vectors, np.arange(len(vectors), dtype=np.int64))
    with open_out(args.out) as f:
        f.write(faiss.serialize_index(index).tobytes())
    with open_out(args.out + ".labels.npy") as f:
        np.save(f, emb.labels)
    with open_out(args.out + META_SUFFIX) as f:
        f.write(json.dumps(emb.meta()).encode())
    print(f"indexed {len(emb)} gallery embeddings ({vectors.shape[1]}-d, inner product) into {redact(args.out)}")
    print(f"ids, labels, the model and its preprocessing (row i = id i) in {redact(args.out)}{META_SUFFIX}")
    return 0


def cmd_search(args: argparse.Namespace) -> int:
    import json
    import math

    from rsk_dist.index import EmbeddingModel, load_gallery, search

    gallery = load_gallery(args.index)
    if len(args.queries) == 1 and args.queries[0].endswith(".npz"):
        queries = load_gallery(args.queries[0])
    else:
        model = EmbeddingModel(args.model or gallery.model, _device(args))
        queries = model.embed(_inputs(args.queries, args.exclude_class))
    sims, rows = search(gallery, queries.vectors, min(args.k, len(gallery)))

    def label(i: int, emb) -> dict:
        y = int(emb.labels[i])
        return {"label": None if y < 0 else y, "class": emb.class_names[y] if 0 <= y < len(emb.class_names) else None}

    results = [
        {"query": queries.ids[q], **label(q, queries), "hits": [
            {"rank": r + 1, "id": gallery.ids[g], **label(g, gallery), "similarity": float(s),
             "distance": math.sqrt(max(0.0, 2.0 - 2.0 * float(s)))}
            for r, (g, s) in enumerate(zip(rows[q].tolist(), sims[q].tolist()))
        ]}
        for q in range(len(queries))
    ]
    if args.json:
        print(json.dumps({"index": redact(args.index), "k": int(rows.shape[1]), "results": results}))
        return 0
    print("rank  similarity  distance  id  class   (cosine similarity; distance between the unit vectors)")
    for res in results:
        print(f"query {res['query']}" + (f"  ({res['class'] or res['label']})" if res["label"] is not None else ""))
        for hit in res["hits"]:
            tag = f"  {hit['class'] or hit['label']}" if hit["label"] is not None else ""
            print(f"{hit['rank']:>4}  {hit['similarity']:10.4f}  {hit['distance']:8.4f}  {hit['id']}{tag}")
    return 0


def with_device(p: argparse.ArgumentParser) -> None:
    p.add_argument("--device", default=None, metavar="DEVICE",
                   help="where the model runs: cpu, cuda, cuda:1... (default: cuda when available, else cpu)")


def add_commands(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("eval", help="retrieval metrics of a checkpoint on a data set")
    p.add_argument("checkpoint_url", metavar="CHECKPOINT_URL", type=url_arg,
                   help="a checkpoint directory: RUN/checkpoint_epoch_NNNNN or RUN/best")
    with_data(p)
    with_device(p)
    p.add_argument("--k", type=int, nargs="+", default=[1, 2, 4, 8], metavar="K", help="Recall@k values")
    p.add_argument("--protocol", choices=["all", "vehicleid", "revisited"], default="all",
                   help="all: every image queries the others; vehicleid: one gallery image per identity; "
                        "revisited: --queries against the --data gallery, Revisited Oxford/Paris mAP")
    p.add_argument("--queries", metavar="KIND:URL[:SPLIT]", type=url_arg, help="query images for --protocol revisited")
    p.add_argument("--ground-truth", metavar="URL", type=url_arg, help="ground-truth JSON for --protocol revisited")
    p.add_argument("--gallery-model", metavar="MODEL_URL", type=url_arg,
                   help="a teacher checkpoint or TorchScript export that embeds the gallery: metrics symmetric, "
                        "asymmetric_ and teacher_")
    p.set_defaults(func=cmd_eval)

    p = sub.add_parser("export", help="export a checkpoint's embedding model, with its preprocessing record")
    p.add_argument("checkpoint_url", metavar="CHECKPOINT_URL", type=url_arg,
                   help="a checkpoint directory: RUN/checkpoint_epoch_NNNNN or RUN/best")
    p.add_argument("out", metavar="OUT", type=url_arg,
                   help="output file (local path or fsspec URL); the preprocessing record goes to OUT.preprocess.json")
    p.add_argument("--format", required=True, choices=("torchscript", "onnx"))
    p.add_argument("--image-size", type=int, default=None, metavar="N",
                   help="input size for tracing and in the record (default: the model's training size)")
    p.set_defaults(func=cmd_export)

    model_help = "a checkpoint directory, or a TorchScript export with its OUT.preprocess.json beside it"
    inputs_help = ("image files, folders or zips of them (ids: their paths), or data sources as eval's --data "
                   "takes them (KIND:URL[:SPLIT]: ids are an ingest's sample ids)")

    p = sub.add_parser("embed", help="embed images with a model, with exactly its training's test-time preprocessing")
    p.add_argument("model_url", metavar="CHECKPOINT_OR_EXPORT", type=url_arg, help=model_help)
    p.add_argument("images", metavar="IMAGES", nargs="+", type=url_arg, help=inputs_help)
    p.add_argument("--out", required=True, metavar="FILE.npz", type=url_arg,
                   help="output .npz: vectors, ids, labels, class_names, preprocess, model (see rsk_dist.index)")
    p.add_argument("--exclude-class", action="append", default=[], metavar="NAME",
                   help="leave out a class of a data source; repeatable")
    p.add_argument("--image-size", type=int, default=None, metavar="N", help="input size (default: the model's)")
    with_device(p)
    p.set_defaults(func=cmd_embed)

    p = sub.add_parser("export-index", help="a faiss index of a gallery's embeddings, with ids, labels and preprocessing")
    p.add_argument("checkpoint_url", metavar="CHECKPOINT_OR_EXPORT", type=url_arg, help=model_help)
    with_data(p)
    with_device(p)
    p.add_argument("out", metavar="OUT", type=url_arg,
                   help="output index file (local path or fsspec URL); OUT.meta.json and OUT.labels.npy beside it")
    p.set_defaults(func=cmd_export_index)

    p = sub.add_parser("search", help="the nearest gallery items of query images")
    p.add_argument("index", metavar="INDEX", type=url_arg, help="an export-index output, or an embed output (.npz)")
    p.add_argument("queries", metavar="QUERY_IMAGES", nargs="+", type=url_arg,
                   help=inputs_help + "; or one embed output (.npz)")
    p.add_argument("--k", type=int, default=5, metavar="K", help="neighbours per query (default 5)")
    p.add_argument("--model", metavar="CHECKPOINT_OR_EXPORT", type=url_arg, default=None,
                   help="embeds the queries (default: the model the index was made with)")
    p.add_argument("--exclude-class", action="append", default=[], metavar="NAME",
                   help="leave out a class of a data source; repeatable")
    p.add_argument("--json", action="store_true", help="print one JSON document instead of a table")
    with_device(p)
    p.set_defaults(func=cmd_search)
