"""Using a trained model: embedding images (``rsk-dist embed``), a gallery index of them
(``export-index``) and nearest-neighbour search in it (``search``).

A model is a checkpoint directory (its preprocessing follows from its job config, see
:meth:`rsk_dist.preprocess.Preprocess.for_config`) or a TorchScript export with its
preprocessing record beside it (``OUT.preprocess.json``, which ``rsk-dist export`` writes).

Inputs are image files, folders of them and zips of them (searched recursively, images sorted by
path; ids: their paths, ``folder/a/b.png`` and ``x.zip/a/b.png``; labels unknown, -1), decoded
with the model's :class:`~rsk_dist.preprocess.Preprocess`; or data sources as ``eval`` takes
them (``KIND:URL[:SPLIT]``), embedded exactly as ``eval`` embeds them (ids: the ingest's sample
ids for ``shards``, which are the images' paths in the source for the ``folders`` layout; the
source's name and row for ``zip`` and ``digits``; labels: the split's classes).

What is written:

- ``embed``: one ``.npz`` (``numpy.load``): ``vectors`` (N x D float32, unit length: inner
  product is cosine similarity), ``ids`` (N strings), ``labels`` (N int64, -1 where unknown),
  ``class_names`` (labels index it; empty where unknown), ``preprocess`` (the record, JSON) and
  ``model`` (the model's URL).
- ``export-index``: the faiss index at ``OUT`` (an ``IndexIDMap`` over an ``IndexFlatIP``: id i is
  row i), ``OUT.labels.npy`` (the labels) and ``OUT.meta.json``: ``ids``, ``labels``,
  ``class_names``, ``model`` and ``preprocess`` (the record).
"""
from __future__ import annotations

import contextlib
import io
import json
import os
import warnings
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field, replace
from functools import partial
from typing import Any

import numpy as np
import torch

from rsk_dist.config import DataConfig, DataSource, local_absolute
from rsk_dist.preprocess import Preprocess
from rsk_dist.storage import filesystem, redact

RECORD_SUFFIX = ".preprocess.json"
META_SUFFIX = ".meta.json"
DEFAULT_CHUNK = 256
JIT_DEPRECATED = r"`torch\.jit\.\w+` is deprecated"  # torch's FutureWarning; TorchScript is what was exported


def resolve_device(device: str | torch.device | None) -> torch.device:
    """``device``, or CUDA when available and else the CPU; refused when it is not here."""
    try:
        out = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    except RuntimeError as err:
        raise ValueError(f"--device {device!r}: {err}; use e.g. cpu, cuda or cuda:1") from None
    if out.type == "cuda" and not (torch.cuda.is_available() and (out.index or 0) < torch.cuda.device_count()):
        raise ValueError(f"--device {device}: no such CUDA device here ({torch.cuda.device_count()} visible); use --device cpu")
    return out


@dataclass
class Embeddings:
    """Vectors with what identifies each row; ``labels[i]`` indexes ``class_names`` where known (else -1)."""

    vectors: np.ndarray
    ids: list[str]
    labels: np.ndarray
    model: str
    preprocess: Preprocess
    class_names: list[str] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.ids)

    def save(self, out: Any) -> None:
        """As one ``.npz`` into the binary file ``out``."""
        np.savez(out, vectors=self.vectors, ids=np.array(self.ids, dtype=str), labels=self.labels,
                 class_names=np.array(self.class_names, dtype=str), preprocess=self.preprocess.to_json(),
                 model=self.model)

    def meta(self) -> dict[str, Any]:
        """What ``export-index`` stores beside the vectors."""
        return {"ids": self.ids, "labels": self.labels.tolist(), "class_names": self.class_names,
                "model": self.model, "preprocess": json.loads(self.preprocess.to_json())}


def _read(url: str) -> bytes:
    fs, path = filesystem(url)
    return fs.cat_file(path)


def load_gallery(url: str) -> Embeddings:
    """An ``embed`` output (``.npz``) or an ``export-index`` output (the faiss index and its ``.meta.json``)."""
    if url.endswith(".npz"):
        with np.load(io.BytesIO(_read(url)), allow_pickle=False) as f:
            return Embeddings(f["vectors"], f["ids"].tolist(), f["labels"], str(f["model"]),
                              Preprocess.from_json(str(f["preprocess"])), f["class_names"].tolist())
    import faiss

    blob = _read(url)
    try:
        meta = json.loads(_read(url + META_SUFFIX))
    except FileNotFoundError:
        raise FileNotFoundError(
            f"{redact(url)}{META_SUFFIX} is missing: an index written by an older export-index has no ids or "
            "preprocessing beside it; run export-index again"
        ) from None
    idmap = faiss.deserialize_index(np.frombuffer(blob, dtype=np.uint8))
    rows = faiss.vector_to_array(idmap.id_map)
    vectors = faiss.downcast_index(idmap.index).reconstruct_n(0, idmap.ntotal)
    if sorted(rows.tolist()) != list(range(len(meta["ids"]))):
        raise ValueError(f"{redact(url)}: the index's ids do not match the {len(meta['ids'])} rows of its {META_SUFFIX}")
    out = np.empty_like(vectors)
    out[rows] = vectors
    return Embeddings(out, meta["ids"], np.asarray(meta["labels"], dtype=np.int64), meta["model"],
                      Preprocess.from_json(json.dumps(meta["preprocess"])), meta["class_names"])


def load_export(url: str, device: str | torch.device = "cpu") -> tuple[torch.jit.ScriptModule, Preprocess]:
    """A TorchScript export (``rsk-dist export``) on ``device``, in eval mode, and the
    preprocessing record beside it."""
    if url.endswith(".onnx"):
        raise ValueError(
            f"{redact(url)} is an ONNX export: rsk-dist runs checkpoints and TorchScript exports; run "
            f"an ONNX export with onnxruntime and its {RECORD_SUFFIX} (README, 'Use your model')"
        )
    try:
        record = _read(url + RECORD_SUFFIX).decode()
    except FileNotFoundError:
        raise FileNotFoundError(
            f"{redact(url)}{RECORD_SUFFIX} is missing: the export's preprocessing record; export the "
            "checkpoint again (rsk-dist export writes it), or pass the checkpoint"
        ) from None
    try:
        preprocess = Preprocess.from_json(record)
    except ValueError as err:
        raise ValueError(f"{redact(url)}{RECORD_SUFFIX}: {err}; export the checkpoint again") from None
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", JIT_DEPRECATED, FutureWarning)
        return torch.jit.load(io.BytesIO(_read(url)), map_location=device).eval(), preprocess


class EmbeddingModel:
    """A checkpoint or a TorchScript export on ``device``, with its preprocessing."""

    def __init__(self, url: str, device: str | torch.device | None = None, image_size: int | None = None) -> None:
        self.url, self.device = url, resolve_device(device)
        self._open(url)
        if image_size:  # as eval's --image-size: the size the model is run at, not its training size
            self.preprocess = replace(self.preprocess, size=image_size)
            if self.config is not None:
                self.config = self.config.model_copy(update={"data": self.config.data.model_copy(update={"image_size": image_size})})

    def _open(self, url: str) -> None:
        fs, path = filesystem(url)
        self.config: Any = None
        if not fs.exists(path):
            raise FileNotFoundError(f"{redact(url)} does not exist: pass a checkpoint directory or a TorchScript export")
        if fs.isdir(path):
            from rsk_dist.checkpoint import load_model

            model, self.config = load_model(url)
            self.module: Any = model.to(self.device)
            self.preprocess = Preprocess.for_config(self.config)
            self.chunk_size = self.config.train.chunk_size
            return
        self.module, self.preprocess = load_export(url, self.device)
        self.chunk_size = DEFAULT_CHUNK

    def embed(self, inputs: Sequence[str | DataSource]) -> Embeddings:
        """Embeddings of every input, in order: data sources and image paths (see the module
        docstring). Labels and class names are kept for a single input; several inputs' labels
        would name different classes, so they are -1."""
        parts = [self._embed_source(x) if isinstance(x, DataSource) else self._embed_files(x) for x in inputs]
        vectors, ids = np.concatenate([p[0] for p in parts]), [i for p in parts for i in p[1]]
        labels, classes = (parts[0][2], parts[0][3]) if len(parts) == 1 else (np.full(len(ids), -1), [])
        # an absolute model path: search finds it from any directory
        return Embeddings(vectors, ids, labels.astype(np.int64), local_absolute(self.url) or self.url, self.preprocess, classes)

    def _embed_source(self, spec: DataSource) -> tuple[np.ndarray, list[str], np.ndarray, list[str]]:
        from rsk_dist.evaluate import embed_source
        from rsk_dist.train import open_source

        data = self.config.data if self.config is not None else DataConfig(train=spec, image_size=self.preprocess.size)
        feeder = open_source(spec, data, train=False, in_channels=self.preprocess.channels, device=self.device)
        vectors, labels = embed_source(self.module, feeder, chunk_size=self.chunk_size)
        source = feeder.source
        name = ":".join(x for x in (spec.kind, redact(spec.url or ""), spec.split or "") if x)
        ids = list(getattr(source, "sample_ids", None) or [f"{name}#{i}" for i in range(len(labels))])
        return vectors.cpu().numpy(), ids, labels.cpu().numpy(), list(getattr(source, "class_names", []))

    def _embed_files(self, url: str) -> tuple[np.ndarray, list[str], np.ndarray, list[str]]:
        vectors, ids = [], []
        with _image_files(url) as files, torch.no_grad():
            for start in range(0, len(files), self.chunk_size):
                batch = []
                for name, read in files[start : start + self.chunk_size]:
                    try:
                        batch.append(self.preprocess.decode(read()))
                    except Exception as err:  # noqa: BLE001 - Pillow raises many types for a bad image
                        raise ValueError(f"cannot decode image {redact(name)}: {type(err).__name__}: {err}") from None
                    ids.append(name)
                images = torch.from_numpy(np.stack(batch)).to(self.device)
                vectors.append(self.module(self.preprocess.to_float(images)).float().cpu().numpy())
        return np.concatenate(vectors), ids, np.full(len(ids), -1, dtype=np.int64), []


@contextlib.contextmanager
def _image_files(url: str) -> Iterator[list[tuple[str, Callable[[], bytes]]]]:
    """``(id, read)`` of the image ``url``, or of every image in the folder or zip ``url``."""
    from rsk_dist.ingest.layouts import is_image, open_tree

    fs, path = filesystem(url)
    if not (url.lower().endswith(".zip") or fs.isdir(path)):
        if not fs.exists(path):
            raise FileNotFoundError(f"{redact(url)} does not exist")
        yield [(url, lambda: fs.cat_file(path))]
        return
    tree = open_tree(url)
    try:
        root = url.rstrip("/" + os.sep)
        files = [(f"{root}/{rel}", partial(tree.read, rel)) for rel in sorted(p for p in tree.files if is_image(p))]
        if not files:
            raise ValueError(f"{redact(url)} holds no images")
        yield files
    finally:
        tree.close()


def search(gallery: Embeddings, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """The ``k`` gallery rows nearest to each query (cosine similarity, larger first; equal ones
    in gallery order, as evaluation ranks them): ``(similarities, rows)``, each ``len(queries) x k``."""
    from rsk_dist.metrics import knn

    if queries.shape[1:] != gallery.vectors.shape[1:]:
        raise ValueError(f"queries of {queries.shape[1]} dimensions against a gallery of {gallery.vectors.shape[1]}: "
                         "embed them with the gallery's model")
    sims, rows = knn(torch.from_numpy(np.ascontiguousarray(queries, dtype=np.float32)),
                     torch.from_numpy(np.ascontiguousarray(gallery.vectors, dtype=np.float32)), k, exclude_self=False)
    return sims.numpy(), rows.numpy()
