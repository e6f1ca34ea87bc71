"""The source layouts :func:`rsk_dist.ingest.ingest` reads: each parser lists a source tree's
samples (split, class, image path) without reading the images.

Layouts (classes are numbered 0..C-1 over the whole dataset, in the order given below;
``split`` is the index's split column):

``folders``   ``root/<class>/<image>`` (split ``default_split``) or ``root/<split>/<class>/<image>``
              (split folders named train, val, valid, validation, test, query, gallery,
              trainval, database); a class may be nested (``Alphabet/character01``), and a
              single top folder shared by every image is dropped, as in
              :func:`rsk_dist.data.omniglot.load_image_folder_zip`. ``source`` may also be an
              image-folder ``.zip`` (Omniglot's ``images_background_small1.zip`` gives classes
              ``Balinese/character01``...). Classes sorted by name.
``cub200``    ``CUB_200_2011/{images.txt,image_class_labels.txt,classes.txt,images/}``; the first
              half of the class ids (1-100) ``train``, the rest (101-200) ``test``.
``cars196``   ``cars_annos.csv`` (header ``relative_path,class[,class_name]``, paths like
              ``car_ims/000001.jpg``, class ids 1..196) beside ``car_ims/``; or the original
              ``cars_annos.mat`` when scipy is installed. First half of the class ids (1-98)
              ``train``, the rest ``test`` (the file's own ``test`` flag is ignored).
``sop``       ``Stanford_Online_Products/Ebay_{train,test}.txt`` (``image_id class_id
              super_class_id path``); splits as given.
``inaturalist`` the Smooth-AP split files at the root: one ``*.txt`` whose name contains
              ``train`` and one containing ``test`` (e.g. ``Inaturalist_train_set1.txt``), lines
              ``train_val2018/<super>/<class>/<image>.jpg`` relative to the root; class = the
              class folder (named ``<super>/<class>``).
``vehicleid`` ``VehicleID_V1.0/train_test_split/{train_list,test_list_800,test_list_1600,
              test_list_2400}.txt`` (lines ``<image> <vehicle id>``), images
              ``image/<image>.jpg``; splits ``train``, ``test_800``, ``test_1600``, ``test_2400``
              (an image in several splits is stored once).

Dataset roots are found at ``source`` or one folder below it (``source/CUB_200_2011/...``).
"""
from __future__ import annotations

import io
import logging
import os
import posixpath
import zipfile
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from rsk_dist.data.omniglot import IMAGE_EXTENSIONS
from rsk_dist.storage import StorageError, explain_error, filesystem, join, protocol_of, redact

log = logging.getLogger(__name__)

LAYOUTS = ("folders", "cub200", "cars196", "sop", "inaturalist", "vehicleid")
SPLIT_NAMES = {"train", "val", "valid", "validation", "test", "query", "gallery", "trainval", "database"}
SPLIT_ORDER = {"train": 0, "trainval": 1, "val": 2, "valid": 2, "validation": 2, "test": 3, "query": 4, "gallery": 5}


class IngestError(StorageError):
    """A source that cannot be ingested as the layout describes; names the file and the fix."""


@dataclass(frozen=True)
class Sample:
    split: str
    class_key: Any  # sortable within a layout; classes are numbered in its order
    class_name: str
    sample_id: str
    src: str  # the image's path inside the source tree


# --------------------------------------------------------------------------- source trees


class Tree:
    """Files of the source: ``files`` maps a posix path to (size, version token)."""

    name: str
    files: dict[str, tuple[int, str]]
    parallel_reads = True

    def read(self, rel: str) -> bytes:  # pragma: no cover - interface
        raise NotImplementedError

    def text(self, rel: str) -> str:
        return self.read(rel).decode("utf-8-sig")

    def close(self) -> None:
        pass


class _DirTree(Tree):
    def __init__(self, url: str) -> None:
        self.name = redact(url)
        self.fs, self.root = filesystem(url)
        try:
            listing = self.fs.find(self.root, detail=True)
        except Exception as err:  # noqa: BLE001
            raise explain_error(err, url, "list the source") from None
        if not listing:
            raise IngestError(f"source {self.name} is empty or does not exist")
        prefix = self.root.rstrip("/") + "/"
        self.files = {}
        for path, info in listing.items():
            if info.get("type", "file") != "file" or not path.startswith(prefix):
                continue
            token = info.get("ETag") or info.get("etag") or info.get("mtime") or info.get("md5") or ""
            self.files[path[len(prefix):]] = (int(info.get("size") or 0), str(token))

    def read(self, rel: str) -> bytes:
        try:
            return self.fs.cat_file(join(self.root, rel))
        except Exception as err:  # noqa: BLE001
            raise explain_error(err, f"{self.name}/{rel}", "read") from None


class _ZipTree(Tree):
    parallel_reads = False

    def __init__(self, url: str) -> None:
        self.name = redact(url)
        fs, path = filesystem(url)
        try:
            self._handle = fs.open(path, "rb")
            self.archive = zipfile.ZipFile(self._handle)
        except zipfile.BadZipFile as err:
            raise IngestError(f"source {self.name} is not a readable zip file: {err}") from None
        except FileNotFoundError:
            raise IngestError(f"source {self.name} does not exist") from None
        self.files = {
            info.filename: (info.file_size, f"crc32:{info.CRC:08x}")
            for info in self.archive.infolist()
            if not info.is_dir()
        }

    def read(self, rel: str) -> bytes:
        return self.archive.read(rel)

    def close(self) -> None:
        self.archive.close()
        self._handle.close()


def open_tree(source: str) -> Tree:
    source = os.fspath(source)
    if source.lower().endswith(".zip"):
        return _ZipTree(source)
    if protocol_of(source) == "file" and not os.path.isdir(source.removeprefix("file://")):
        raise IngestError(f"source {redact(source)} is not a folder (or an image-folder .zip)")
    return _DirTree(source)


def is_image(path: str) -> bool:
    base = posixpath.basename(path)
    return (
        path.lower().endswith(IMAGE_EXTENSIONS)
        and not path.startswith("__MACOSX/")
        and not base.startswith(".")
    )


def _locate(tree: Tree, marker: str, wrapper: str, layout: str) -> str:
    """The prefix under which ``marker`` sits: '' or ``wrapper/`` (or any one folder)."""
    for prefix in ("", f"{wrapper}/"):
        if prefix + marker in tree.files:
            return prefix
    candidates = sorted(p[: -len(marker)] for p in tree.files if p.endswith("/" + marker) and p.count("/") == marker.count("/") + 1)
    if len(candidates) == 1:
        return candidates[0]
    raise IngestError(
        f"{layout}: {tree.name} has no {wrapper}/{marker}: point the source at the folder that "
        f"holds {wrapper}/ (or at {wrapper}/ itself)"
    )


def _lines(tree: Tree, rel: str, layout: str) -> list[list[str]]:
    if rel not in tree.files:
        raise IngestError(f"{layout}: {tree.name} is missing {rel}")
    return [line.split() for line in tree.text(rel).splitlines() if line.strip()]


def _int(value: str, where: str) -> int:
    try:
        return int(value)
    except ValueError:
        raise IngestError(f"{where}: {value!r} is not an integer") from None


def _half_split(keys: list[Any]) -> dict[Any, str]:
    ordered = sorted(set(keys))
    half = len(ordered) // 2
    return {k: ("train" if i < half else "test") for i, k in enumerate(ordered)}


# --------------------------------------------------------------------------- layouts


def _layout_folders(tree: Tree, default_split: str = "train") -> list[Sample]:
    entries = sorted(p for p in tree.files if is_image(p))
    if not entries:
        raise IngestError(f"folders: {tree.name} holds no images (looked for {', '.join(IMAGE_EXTENSIONS)})")
    dirs = [posixpath.dirname(e) for e in entries]
    loose = [e for e, d in zip(entries, dirs) if not d]
    if loose:
        raise IngestError(f"folders: image {loose[0]!r} in {tree.name} is not inside a class folder")
    parts = [d.split("/") for d in dirs]

    def split_layout(ps: list[list[str]]) -> bool:
        return all(p[0].lower() in SPLIT_NAMES and len(p) >= 2 for p in ps)

    if not split_layout(parts) and len({p[0] for p in parts}) == 1 and all(len(p) >= 2 for p in parts):
        parts = [p[1:] for p in parts]  # a top folder every image shares (a zip's root folder)
    with_splits = split_layout(parts)
    samples = []
    for entry, p in zip(entries, parts):
        split, cls = (p[0].lower(), p[1:]) if with_splits else (default_split, p)
        name = "/".join(cls)
        samples.append(Sample(split, name, name, entry, entry))
    return samples


def _layout_cub200(tree: Tree) -> list[Sample]:
    base = _locate(tree, "images.txt", "CUB_200_2011", "cub200")
    paths = {r[0]: r[1] for r in _lines(tree, base + "images.txt", "cub200") if len(r) >= 2}
    labels = {r[0]: _int(r[1], base + "image_class_labels.txt") for r in _lines(tree, base + "image_class_labels.txt", "cub200") if len(r) >= 2}
    names = {}
    if base + "classes.txt" in tree.files:
        names = {_int(r[0], base + "classes.txt"): r[1] for r in _lines(tree, base + "classes.txt", "cub200") if len(r) >= 2}
    missing = sorted(set(paths) - set(labels))
    if missing:
        raise IngestError(f"cub200: image ids {missing[:5]} of images.txt have no class in image_class_labels.txt")
    split_of = _half_split(list(labels.values()))
    return [
        Sample(
            split_of[labels[i]],
            labels[i],
            names.get(labels[i], posixpath.dirname(rel) or str(labels[i])),
            rel,
            f"{base}images/{rel}",
        )
        for i, rel in paths.items()
    ]


def _layout_cars196(tree: Tree) -> list[Sample]:
    rows: list[tuple[str, int, str | None]] = []
    try:
        base = _locate(tree, "cars_annos.csv", "cars196", "cars196")
    except IngestError:
        base = None
    if base is not None:
        import csv

        reader = csv.DictReader(io.StringIO(tree.text(base + "cars_annos.csv")))
        fields = set(reader.fieldnames or [])
        if not {"relative_path", "class"} <= fields:
            raise IngestError(
                f"cars196: {base}cars_annos.csv needs a header with columns relative_path,class "
                f"(optionally class_name); it has {sorted(fields)}"
            )
        for n, row in enumerate(reader, start=2):
            rows.append((row["relative_path"].strip(), _int(row["class"], f"cars_annos.csv line {n}"), (row.get("class_name") or "").strip() or None))
    else:
        try:
            base = _locate(tree, "cars_annos.mat", "cars196", "cars196")
        except IngestError:
            raise IngestError(
                f"cars196: {tree.name} has neither cars_annos.csv (relative_path,class[,class_name]) "
                "nor cars_annos.mat"
            ) from None
        try:
            from scipy.io import loadmat
        except ImportError:
            raise IngestError(
                "cars196: reading cars_annos.mat needs scipy (pip install scipy), or convert it to "
                "cars_annos.csv with columns relative_path,class"
            ) from None
        mat = loadmat(io.BytesIO(tree.read(base + "cars_annos.mat")), squeeze_me=True)
        class_names = [str(c) for c in list(mat.get("class_names", []))]
        for ann in mat["annotations"].ravel():
            cls = int(ann["class"])
            rows.append((str(ann["relative_im_path"]), cls, class_names[cls - 1] if cls - 1 < len(class_names) else None))
    split_of = _half_split([c for _, c, _ in rows])
    return [Sample(split_of[c], c, name or str(c), rel, base + rel) for rel, c, name in rows]


def _layout_sop(tree: Tree) -> list[Sample]:
    base = _locate(tree, "Ebay_train.txt", "Stanford_Online_Products", "sop")
    samples = []
    for split in ("train", "test"):
        rel = f"{base}Ebay_{split}.txt"
        for n, row in enumerate(_lines(tree, rel, "sop"), start=1):
            if row[0] == "image_id":
                continue
            if len(row) < 4:
                raise IngestError(f"sop: {rel} line {n} is not 'image_id class_id super_class_id path'")
            cls = _int(row[1], f"{rel} line {n}")
            samples.append(Sample(split, cls, str(cls), row[3], base + row[3]))
    return samples


def _layout_inaturalist(tree: Tree) -> list[Sample]:
    lists = {}
    for split in ("train", "test"):
        found = sorted(p for p in tree.files if "/" not in p and p.endswith(".txt") and split in p.lower())
        if len(found) != 1:
            raise IngestError(
                f"inaturalist: expected one Smooth-AP split file with {split!r} in its name at the "
                f"root of {tree.name}, found {found or 'none'}"
            )
        lists[split] = found[0]
    samples = []
    for split, rel in lists.items():
        for n, row in enumerate(_lines(tree, rel, "inaturalist"), start=1):
            path = row[0].removeprefix("./")
            parts = path.split("/")
            if len(parts) < 3:
                raise IngestError(f"inaturalist: {rel} line {n}: {path!r} is not <...>/<super>/<class>/<image>")
            key = (0, int(parts[-2]), "") if parts[-2].isdigit() else (1, 0, parts[-2])
            samples.append(Sample(split, key, "/".join(parts[-3:-1]), path, path))
    return samples


def _layout_vehicleid(tree: Tree) -> list[Sample]:
    base = _locate(tree, "train_test_split/train_list.txt", "VehicleID_V1.0", "vehicleid")
    files = {"train": "train_list.txt", "test_800": "test_list_800.txt", "test_1600": "test_list_1600.txt", "test_2400": "test_list_2400.txt"}
    samples = []
    for split, name in files.items():
        rel = f"{base}train_test_split/{name}"
        if split != "train" and rel not in tree.files:
            log.warning("vehicleid: %s is missing; no %s split", rel, split)
            continue
        for n, row in enumerate(_lines(tree, rel, "vehicleid"), start=1):
            if len(row) < 2:
                raise IngestError(f"vehicleid: {rel} line {n} is not '<image> <vehicle id>'")
            vid = _int(row[1], f"{rel} line {n}")
            samples.append(Sample(split, vid, str(vid), row[0], f"{base}image/{row[0]}.jpg"))
    return samples


LAYOUT_FUNCS: dict[str, Callable[..., list[Sample]]] = {
    "folders": _layout_folders,
    "cub200": _layout_cub200,
    "cars196": _layout_cars196,
    "sop": _layout_sop,
    "inaturalist": _layout_inaturalist,
    "vehicleid": _layout_vehicleid,
}
