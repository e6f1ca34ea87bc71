"""Ingest of every layout on tiny generated trees that mimic the real files, idempotence,
interruption and resume, and the errors a bad source gives."""
from __future__ import annotations

import json
import zipfile
from pathlib import Path

import numpy as np
import pytest

from tests.images import OMNIGLOT_ZIP, image_bytes  # noqa: E402
from rsk_dist.ingest import IngestError, ingest  # noqa: E402
from rsk_dist.storage import INDEX, MARKER, PROGRESS, StorageError, index_path, open_dataset, preflight, version_dir  # noqa: E402


def put(path: Path, data: bytes | str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data.encode() if isinstance(data, str) else data)
    return path


def rows_of(url: str) -> dict[tuple[str, str], dict]:
    """(split, sample_id) -> row, with the bytes the index points at."""
    ds = open_dataset(url)
    out = {}
    for row in ds.index.to_pylist():
        data = ds.fs.cat_file(f"{ds.root}/{row['shard']}", start=row["offset"], end=row["offset"] + row["length"])
        out[(row["split"], row["sample_id"])] = {**row, "bytes": data}
    return out


# --------------------------------------------------------------------------- layouts


def test_folders_class_layout_keeps_bytes_and_numbers_classes_by_name(tmp_path):
    src = tmp_path / "src"
    files = {}
    for c, cls in enumerate(["cat", "ant", "bee"]):
        for i in range(3):
            fmt = "JPEG" if i == 1 else "PNG"
            rel = f"{cls}/img{i}.{'jpg' if fmt == 'JPEG' else 'png'}"
            files[rel] = put(src / rel, image_bytes(10 * c + i, fmt)).read_bytes()
    put(src / "ant/.hidden.png", image_bytes(99))
    put(src / "notes.txt", "not an image")
    result = ingest(str(src), str(tmp_path / "out"), "folders", shard_bytes=400)
    assert result.num_samples == 9 and result.num_classes == 3 and result.splits == {"train": 9}
    assert result.num_shards > 1  # 400-byte shards force several
    rows = rows_of(str(tmp_path / "out"))
    assert set(rows) == {("train", rel) for rel in files}
    for (_, rel), row in rows.items():
        assert row["bytes"] == files[rel]
        assert row["class_name"] == rel.split("/")[0]
        assert row["label"] == ["ant", "bee", "cat"].index(row["class_name"])


def test_folders_split_layout(tmp_path):
    src = tmp_path / "src"
    for split, classes in {"train": ["a", "b"], "test": ["c", "d"]}.items():
        for cls in classes:
            for i in range(2):
                put(src / split / cls / f"{i}.png", image_bytes(hash((split, cls, i)) % 1000))
    result = ingest(str(src), str(tmp_path / "out"), "folders")
    assert result.splits == {"train": 4, "test": 4}
    rows = rows_of(str(tmp_path / "out"))
    assert {r["class_name"] for (s, _), r in rows.items() if s == "test"} == {"c", "d"}
    assert rows[("train", "train/b/1.png")]["label"] == 1


def test_folders_zip_with_nested_classes_matches_omniglot_naming(tmp_path):
    zpath = tmp_path / "alphabets.zip"
    members = {}
    with zipfile.ZipFile(zpath, "w") as z:
        for alphabet in ["Greek", "Alpha"]:
            for ch in ["character01", "character02"]:
                for i in range(2):
                    name = f"images_small/{alphabet}/{ch}/{i:04d}_{ch[-2:]}.png"
                    members[name] = image_bytes(len(members))
                    z.writestr(name, members[name])
        z.writestr("__MACOSX/images_small/._junk.png", b"junk")
    result = ingest(str(zpath), "memory://zipped-alphabets", "folders")
    rows = rows_of("memory://zipped-alphabets")
    assert result.num_classes == 4
    assert {r["class_name"] for r in rows.values()} == {f"{a}/character0{k}" for a in ["Greek", "Alpha"] for k in (1, 2)}
    assert all(rows[("train", name)]["bytes"] == data for name, data in members.items())
    assert rows[("train", "images_small/Alpha/character01/0000_01.png")]["label"] == 0


def make_cub(root: Path, classes: int = 4, per_class: int = 3) -> dict[str, bytes]:
    base = root / "CUB_200_2011"
    images, labels, names, files = [], [], [], {}
    n = 0
    for c in range(1, classes + 1):
        folder = f"{c:03d}.Bird_{c}"
        names.append(f"{c} {folder}")
        for i in range(per_class):
            n += 1
            rel = f"{folder}/Bird_{c}_{i:04d}.jpg"
            files[rel] = put(base / "images" / rel, image_bytes(n, "JPEG")).read_bytes()
            images.append(f"{n} {rel}")
            labels.append(f"{n} {c}")
    put(base / "images.txt", "\n".join(images) + "\n")
    put(base / "image_class_labels.txt", "\n".join(labels) + "\n")
    put(base / "classes.txt", "\n".join(names) + "\n")
    put(base / "train_test_split.txt", "\n".join(f"{i} 1" for i in range(1, n + 1)))
    return files


def test_cub200_first_half_of_classes_trains(tmp_path):
    files = make_cub(tmp_path / "cub")
    result = ingest(str(tmp_path / "cub"), str(tmp_path / "out"), "cub200")
    assert result.splits == {"train": 6, "test": 6} and result.num_classes == 4
    rows = rows_of(str(tmp_path / "out"))
    assert {r["class_name"] for (s, _), r in rows.items() if s == "train"} == {"001.Bird_1", "002.Bird_2"}
    assert {r["label"] for (s, _), r in rows.items() if s == "test"} == {2, 3}
    for (_, rel), row in rows.items():
        assert row["bytes"] == files[rel]


def test_cub200_missing_image_is_named(tmp_path):
    make_cub(tmp_path / "cub")
    (tmp_path / "cub/CUB_200_2011/images/003.Bird_3/Bird_3_0001.jpg").unlink()
    with pytest.raises(IngestError, match="Bird_3_0001.jpg"):
        ingest(str(tmp_path / "cub"), str(tmp_path / "out"), "cub200")
    assert not (tmp_path / "out" / MARKER).exists()


def test_cars196_csv_variant(tmp_path):
    root = tmp_path / "cars196"
    lines, files = ["relative_path,class,class_name"], {}
    for k in range(8):
        cls = k // 2 + 1
        rel = f"car_ims/{k + 1:06d}.jpg"
        files[rel] = put(root / rel, image_bytes(k, "JPEG")).read_bytes()
        lines.append(f"{rel},{cls},Maker Model {cls}")
    put(root / "cars_annos.csv", "\n".join(lines) + "\n")
    result = ingest(str(tmp_path), str(tmp_path / "out"), "cars196")  # found one folder down
    assert result.splits == {"train": 4, "test": 4}
    rows = rows_of(str(tmp_path / "out"))
    assert rows[("train", "car_ims/000001.jpg")]["class_name"] == "Maker Model 1"
    assert {r["label"] for (s, _), r in rows.items() if s == "test"} == {2, 3}
    for rel, data in files.items():
        assert rows[("train" if int(rel[8:14]) <= 4 else "test", rel)]["bytes"] == data


def test_cars196_mat_variant(tmp_path):
    import scipy.io as scipy_io
    root = tmp_path / "cars"
    dtype = [("relative_im_path", object), ("bbox_x1", object), ("class", object), ("test", object)]
    ann = np.zeros((1, 4), dtype=dtype)
    for k in range(4):
        rel = f"car_ims/{k + 1:06d}.jpg"
        put(root / rel, image_bytes(k, "JPEG"))
        ann[0, k] = (rel, 1, k // 2 + 1, k % 2)
    names = np.empty((1, 2), dtype=object)
    names[0, 0], names[0, 1] = "AM General Hummer", "Acura RL"
    scipy_io.savemat(root / "cars_annos.mat", {"annotations": ann, "class_names": names})
    result = ingest(str(root), str(tmp_path / "out"), "cars196")
    rows = rows_of(str(tmp_path / "out"))
    assert result.splits == {"train": 2, "test": 2}
    assert rows[("test", "car_ims/000004.jpg")]["class_name"] == "Acura RL"


def test_sop_given_split(tmp_path):
    base = tmp_path / "Stanford_Online_Products"
    header = "image_id class_id super_class_id path"
    train, test, files = [header], [header], {}
    for k in range(6):
        cls = k // 2 + 1
        rel = f"bicycle_final/{100 + cls}_{k % 2}.JPG"
        files[rel] = put(base / rel, image_bytes(k, "JPEG")).read_bytes()
        (train if cls <= 2 else test).append(f"{k + 1} {cls} 1 {rel}")
    put(base / "Ebay_train.txt", "\n".join(train) + "\n")
    put(base / "Ebay_test.txt", "\n".join(test) + "\n")
    put(base / "Ebay_info.txt", header)
    result = ingest(str(tmp_path), str(tmp_path / "out"), "sop")
    rows = rows_of(str(tmp_path / "out"))
    assert result.splits == {"train": 4, "test": 2}
    assert rows[("test", "bicycle_final/103_1.JPG")]["class_name"] == "3"
    assert rows[("test", "bicycle_final/103_1.JPG")]["bytes"] == files["bicycle_final/103_1.JPG"]


def test_inaturalist_smooth_ap_split_files(tmp_path):
    root = tmp_path / "inat"
    train, test, files = [], [], {}
    for k, (sup, cls) in enumerate([("Plantae", "7172"), ("Plantae", "7172"), ("Aves", "12"), ("Aves", "12"), ("Fungi", "900"), ("Fungi", "900")]):
        rel = f"train_val2018/{sup}/{cls}/{k:032x}.jpg"
        files[rel] = put(root / rel, image_bytes(k, "JPEG")).read_bytes()
        (test if sup == "Fungi" else train).append(rel)
    put(root / "Inaturalist_train_set1.txt", "\n".join(train) + "\n")
    put(root / "Inaturalist_test_set1.txt", "\n".join(test) + "\n")
    result = ingest(str(root), str(tmp_path / "out"), "inaturalist")
    rows = rows_of(str(tmp_path / "out"))
    assert result.splits == {"train": 4, "test": 2} and result.num_classes == 3
    by_name = {r["class_name"]: r["label"] for r in rows.values()}
    assert by_name == {"Aves/12": 0, "Fungi/900": 1, "Plantae/7172": 2}  # class folders numerically
    assert all(rows[(s, rel)]["bytes"] == files[rel] for (s, rel) in rows)


def test_vehicleid_splits_share_images(tmp_path):
    base = tmp_path / "VehicleID_V1.0"
    train = []
    for k in range(4):
        put(base / "image" / f"{k:07d}.jpg", image_bytes(k, "JPEG"))
        train.append(f"{k:07d} {k // 2 + 1}")
    test = []
    for k in range(4, 10):
        put(base / "image" / f"{k:07d}.jpg", image_bytes(k, "JPEG"))
        test.append(f"{k:07d} {k // 2 + 10}")
    split = base / "train_test_split"
    put(split / "train_list.txt", "\n".join(train) + "\n")
    put(split / "test_list_800.txt", "\n".join(test[:2]) + "\n")
    put(split / "test_list_1600.txt", "\n".join(test[:4]) + "\n")
    put(split / "test_list_2400.txt", "\n".join(test) + "\n")
    result = ingest(str(tmp_path), str(tmp_path / "out"), "vehicleid")
    assert result.splits == {"train": 4, "test_800": 2, "test_1600": 4, "test_2400": 6}
    assert result.num_images == 10 < result.num_samples == 16  # each image stored once
    rows = rows_of(str(tmp_path / "out"))
    a, b = rows[("test_800", "0000004")], rows[("test_2400", "0000004")]
    assert (a["shard"], a["offset"]) == (b["shard"], b["offset"]) and a["label"] == b["label"]
    assert a["bytes"] == (base / "image/0000004.jpg").read_bytes()
    assert a["class_name"] == "12"


def test_unknown_layout_and_empty_source(tmp_path):
    with pytest.raises(IngestError, match="unknown layout 'imagenet'.*folders"):
        ingest(str(tmp_path), str(tmp_path / "out"), "imagenet")
    with pytest.raises(IngestError, match="no Ebay_train.txt|Stanford_Online_Products/Ebay_train.txt"):
        put(tmp_path / "x.png", image_bytes(0))
        ingest(str(tmp_path), str(tmp_path / "out"), "sop")


# --------------------------------------------------------------------------- idempotence, interruption


def make_folders(root: Path, classes: int = 3, per_class: int = 4) -> None:
    for c in range(classes):
        for i in range(per_class):
            put(root / f"class{c}" / f"{i}.png", image_bytes(100 * c + i))


def test_rerun_writes_nothing(tmp_path):
    make_folders(tmp_path / "src")
    out = tmp_path / "out"
    first = ingest(str(tmp_path / "src"), str(out), "folders", shard_bytes=500)
    stamps = {p: p.stat().st_mtime_ns for p in out.rglob("*")}
    again = ingest(str(tmp_path / "src"), str(out), "folders", shard_bytes=500)
    assert again.skipped and again.shards_written == 0 and first.shards_written == first.num_shards
    assert again.fingerprint == first.fingerprint
    assert {p: p.stat().st_mtime_ns for p in out.rglob("*")} == stamps


def test_changed_source_needs_overwrite(tmp_path):
    make_folders(tmp_path / "src")
    out = str(tmp_path / "out")
    ingest(str(tmp_path / "src"), out, "folders")
    put(tmp_path / "src/class9/0.png", image_bytes(7))
    with pytest.raises(IngestError, match="different content.*overwrite=True"):
        ingest(str(tmp_path / "src"), out, "folders")
    result = ingest(str(tmp_path / "src"), out, "folders", overwrite=True)
    assert result.num_classes == 4 and not result.skipped
    assert preflight(out, need_index=True).manifest["num_classes"] == 4


def test_interrupted_ingest_is_rejected_then_completed_by_a_rerun(tmp_path):
    make_folders(tmp_path / "src", classes=4)
    out = tmp_path / "out"

    def crash(name, done, total):
        if done == 2:
            raise KeyboardInterrupt("simulated crash")

    with pytest.raises(KeyboardInterrupt):
        ingest(str(tmp_path / "src"), str(out), "folders", shard_bytes=300, on_shard_written=crash)
    assert not (out / MARKER).exists() and (out / PROGRESS).exists()
    with pytest.raises(StorageError, match="incomplete ingest.*Re-run"):
        preflight(str(out), need_index=True)
    (first_shard,) = out.glob("shards/*/shard-00000.bin")
    stamp = first_shard.stat().st_mtime_ns
    result = ingest(str(tmp_path / "src"), str(out), "folders", shard_bytes=300)
    assert result.shards_written == result.num_shards - 2  # the two stored shards were kept
    assert first_shard.stat().st_mtime_ns == stamp
    manifest = preflight(str(out), need_index=True).manifest
    assert manifest["num_samples"] == 16 and not (out / PROGRESS).exists()
    marker = json.loads((out / MARKER).read_text())
    assert marker["index"]["sha256"] and marker["index"]["path"] == index_path(result.fingerprint)
    assert (out / index_path(result.fingerprint)).exists() and not (out / INDEX).exists()


def test_omniglot_zip_to_s3_is_idempotent(s3):
    if not OMNIGLOT_ZIP.is_file():
        pytest.skip(f"{OMNIGLOT_ZIP} is absent")
    import boto3

    url = s3.url("omniglot-idempotent")
    first = ingest(str(OMNIGLOT_ZIP), url, "folders", shard_bytes=256 * 1024)
    client = boto3.client("s3", endpoint_url=s3.endpoint)
    prefix = url.split("/", 3)[3]

    def etags() -> dict[str, tuple[str, object]]:
        listing = client.list_objects_v2(Bucket=s3.bucket, Prefix=prefix)["Contents"]
        return {o["Key"]: (o["ETag"], o["LastModified"]) for o in listing}

    before = etags()
    assert f"{prefix}/{MARKER}" in before and first.num_classes == 136 and first.num_samples == 2720
    again = ingest(str(OMNIGLOT_ZIP), url, "folders", shard_bytes=256 * 1024)
    assert again.skipped and again.shards_written == 0
    assert etags() == before


def test_damaged_dataset_is_reported_and_repaired_by_overwrite(tmp_path):
    make_folders(tmp_path / "src")
    out = tmp_path / "out"
    first = ingest(str(tmp_path / "src"), str(out), "folders", shard_bytes=500)
    (out / version_dir(first.fingerprint) / "shard-00001.bin").unlink()
    with pytest.raises(StorageError, match=f"missing shard objects {version_dir(first.fingerprint)}/shard-00001.bin.*overwrite=True"):
        preflight(str(out), need_index=True)
    assert ingest(str(tmp_path / "src"), str(out), "folders", shard_bytes=500).skipped  # trusts its marker
    repaired = ingest(str(tmp_path / "src"), str(out), "folders", shard_bytes=500, overwrite=True)
    assert repaired.shards_written == repaired.num_shards == first.num_shards
    assert preflight(str(out), need_index=True).manifest["fingerprint"] == first.fingerprint


# --------------------------------------------------------------------------- versions


def test_overwrite_while_reading_keeps_the_old_version_consistent(tmp_path):
    """A reader that opened the dataset keeps reading the bytes it indexed while, and after,
    ``overwrite=True`` replaces the content; old shards go only with gc_dataset."""
    import torch

    from rsk_dist.data.shards import ShardReadError, ShardSource
    from rsk_dist.ingest import gc_dataset

    src, out = tmp_path / "src", str(tmp_path / "out")
    make_folders(src)
    first = ingest(str(src), out, "folders", shard_bytes=500)
    reader = ShardSource(out, "train", image_size=8, train=False, in_channels=1)
    everything = torch.arange(len(reader))
    old = reader.read_bytes(everything)
    assert old == [(src / sid).read_bytes() for sid in reader.sample_ids]

    for path in sorted(src.rglob("*.png")):  # same names, new content and sizes
        put(path, image_bytes(len(path.name) * 37 + int(path.stem) + 7, size=(33, 21)))
    seen_during = []

    def read_old(name: str, done: int, total: int) -> None:
        seen_during.append(reader.read_bytes(everything) == old)

    second = ingest(str(src), out, "folders", shard_bytes=500, overwrite=True, on_shard_written=read_old)
    assert second.fingerprint != first.fingerprint and seen_during and all(seen_during)
    assert reader.read_bytes(everything) == old  # after the switch too
    fresh = ShardSource(out, "train", image_size=8, train=False, in_channels=1)
    assert fresh.read_bytes(everything) == [(src / sid).read_bytes() for sid in fresh.sample_ids]
    manifest = json.loads((tmp_path / "out" / MARKER).read_text())
    assert manifest["versions"] == [version_dir(second.fingerprint), version_dir(first.fingerprint)]

    assert gc_dataset(out, keep_last=2) == []
    assert gc_dataset(out, keep_last=1) == [version_dir(first.fingerprint)]
    assert not (tmp_path / "out" / version_dir(first.fingerprint)).exists()
    assert fresh.read_bytes(everything) == [(src / sid).read_bytes() for sid in fresh.sample_ids]
    with pytest.raises(ShardReadError, match="is missing") as err:
        reader.read_bytes(everything)  # what gc's docstring warns of: run it once old jobs ended
    # The fix is to restart the job on the current version, not to re-ingest (issue 23, 11).
    assert "restart the job" in str(err.value) and "re-run the ingest" not in str(err.value)
    with pytest.raises(IngestError, match="keep_last must be at least 1"):
        gc_dataset(out, keep_last=0)


def test_gc_keeps_an_ingest_in_progress_and_removes_pre_versioning_shards(tmp_path):
    from rsk_dist.ingest import gc_dataset

    src, out = tmp_path / "src", tmp_path / "out"
    make_folders(src)
    ingest(str(src), str(out), "folders", shard_bytes=500)
    legacy = put(out / "shards" / "shard-00000.bin", b"from a pre-versioning ingest")
    put(src / "class7/0.png", image_bytes(3))

    def crash(name, done, total):
        raise KeyboardInterrupt("simulated crash")

    with pytest.raises(KeyboardInterrupt):
        ingest(str(src), str(out), "folders", shard_bytes=500, overwrite=True, on_shard_written=crash)
    progress = json.loads((out / PROGRESS).read_text())
    assert gc_dataset(str(out)) == ["shards"] and not legacy.exists()
    assert (out / version_dir(progress["fingerprint"])).is_dir()  # the interrupted overwrite's
    resumed = ingest(str(src), str(out), "folders", shard_bytes=500, overwrite=True)
    assert resumed.shards_written == resumed.num_shards - 1  # resumed, not restarted
