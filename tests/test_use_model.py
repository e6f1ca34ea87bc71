"""Using a trained model: the preprocessing record, ``embed``, ``export-index`` and ``search``,
on the quickstart's model, against ``eval``."""
from __future__ import annotations

import pytest

from rsk_dist.checkpoint import CheckpointError, checkpoint_name, load_state, save_state


def test_a_run_folder_is_named_as_such_with_what_to_pass(tmp_path):
    run = tmp_path / "quickstart"
    save_state(run / checkpoint_name(2, 0), {"x": 1})
    save_state(run / checkpoint_name(3, 0), {"x": 2})
    (run / checkpoint_name(4, 0)).mkdir()  # being written: no manifest yet
    with pytest.raises(CheckpointError, match="is a run folder, not a checkpoint") as err:
        load_state(str(run))
    assert f"its latest checkpoint {run}/{checkpoint_name(3, 0)}" in str(err.value)
    assert "best" not in str(err.value)
    save_state(run / "best", {"x": 3})
    with pytest.raises(CheckpointError, match=f"or its best model {run}/best"):
        load_state(str(run))
    with pytest.raises(CheckpointError, match="not a complete checkpoint"):
        load_state(str(run / checkpoint_name(4, 0)))
    with pytest.raises(CheckpointError, match="nothing does not exist: pass a checkpoint directory"):
        load_state(str(tmp_path / "nothing"))


# --------------------------------------------------------------------------- the quickstart's model

import json  # noqa: E402
import re  # noqa: E402
import zipfile  # noqa: E402
from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402
import torch  # noqa: E402

from rsk_dist.cli import main  # noqa: E402
from rsk_dist.config import DataSource, load_config  # noqa: E402
from rsk_dist.index import EmbeddingModel, load_gallery  # noqa: E402
from rsk_dist.preprocess import IMAGENET_MEAN, IMAGENET_STD, Preprocess  # noqa: E402
from tests.images import image_bytes  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def quickstart(tmp_path_factory) -> Path:
    """jobs/quickstart.yaml's model after one epoch, trained in this process (no Ray)."""
    from rsk_dist.train import Trainer

    tmp = tmp_path_factory.mktemp("quickstart")
    config = load_config(ROOT / "jobs" / "quickstart.yaml", ["train.epochs=1", f"run.storage_path=file://{tmp}/runs"])
    trainer = Trainer(config, torch.device("cpu"))
    trainer.run(lambda metrics, state: None)
    save_state(tmp / "ckpt", trainer.state())
    return tmp / "ckpt"


def _recall_at_1_of_search(results: list[dict]) -> float:
    """Recall@1 from search results of a set against itself: the first hit that is not the query."""
    hits = [next(h for h in r["hits"] if h["id"] != r["query"])["label"] == r["label"] for r in results]
    return sum(hits) / len(hits)


def test_quickstart_model_export_embed_index_search_recall_equals_eval(quickstart, tmp_path, capsys):
    ckpt = str(quickstart)
    assert main(["eval", ckpt, "--data", "digits:test", "--k", "1", "--device", "cpu"]) == 0
    out = capsys.readouterr().out
    evaluated = json.loads(out.split("metrics ", 1)[1])["recall@1"]

    assert main(["export-index", ckpt, "--data", "digits:test", str(tmp_path / "gallery.faiss"), "--device", "cpu"]) == 0
    meta = json.loads((tmp_path / "gallery.faiss.meta.json").read_text())
    assert Preprocess.from_json(json.dumps(meta["preprocess"])) == Preprocess(8, 1, "stretch")
    from rsk_dist.data.sources import digits_split

    assert len(meta["ids"]) == len(set(meta["ids"])) == len(meta["labels"]) == len(digits_split("test"))
    capsys.readouterr()
    assert main(["search", str(tmp_path / "gallery.faiss"), "digits:test", "--k", "3", "--json", "--device", "cpu"]) == 0
    results = json.loads(capsys.readouterr().out)["results"]
    assert [r["query"] for r in results] == meta["ids"]
    assert _recall_at_1_of_search(results) == evaluated  # the same count over the same queries

    # The same path through the TorchScript export and its preprocessing record.
    model = tmp_path / "model.pt"
    assert main(["export", ckpt, str(model), "--format", "torchscript"]) == 0
    assert Preprocess.from_json((tmp_path / "model.pt.preprocess.json").read_text()) == Preprocess(8, 1, "stretch")
    assert main(["embed", str(model), "digits:test", "--out", str(tmp_path / "q.npz"), "--device", "cpu"]) == 0
    exported, gallery = load_gallery(str(tmp_path / "q.npz")), load_gallery(str(tmp_path / "gallery.faiss"))
    assert exported.ids == gallery.ids and np.array_equal(exported.labels, gallery.labels)
    # float32 embeddings of unit length, by a traced copy of the same graph: within a few ulps
    np.testing.assert_allclose(exported.vectors, gallery.vectors, rtol=0, atol=1e-5)
    capsys.readouterr()
    # embed's .npz serves as an index too
    assert main(["embed", ckpt, "digits:test", "--out", str(tmp_path / "g.npz"), "--device", "cpu"]) == 0
    assert main(["search", str(tmp_path / "g.npz"), str(tmp_path / "g.npz"), "--k", "3", "--json"]) == 0
    assert _recall_at_1_of_search(json.loads(capsys.readouterr().out.split("\n", 1)[1])["results"]) == evaluated
    assert main(["search", str(tmp_path / "gallery.faiss"), str(tmp_path / "q.npz"), "--k", "2"]) == 0
    table = capsys.readouterr().out
    assert table.splitlines()[1] == f"query {gallery.ids[0]}  ({gallery.labels[0]})" and "similarity" in table


def _digit_pngs(folder: Path, count: int = 30) -> list[Path]:
    """The first ``count`` test digits as 8-bit PNGs, bright strokes on dark as the digits are."""
    from PIL import Image

    from rsk_dist.data.sources import digits_split

    source = digits_split("test")
    paths = []
    for i in range(count):
        pixels = (source.images[i, 0].numpy() * 255).round().astype(np.uint8)
        paths.append(folder / f"{int(source.labels[i])}" / f"{i:03d}.png")
        paths[-1].parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(pixels).resize((32, 32), Image.Resampling.NEAREST).save(paths[-1])  # a larger file
    return paths


def check_snippet_matches_embed(checkpoint: str, image: Path, cwd: Path, monkeypatch) -> None:
    """The README's loading code (torch, Pillow and numpy alone) gives ``embed``'s vector for
    ``image`` under the checkpoint's TorchScript export."""
    readme = (ROOT / "README.md").read_text()
    snippet = re.search(r"```python\n(.*?)```", readme.split("## Use your model", 1)[1], re.S).group(1)
    assert "rsk_dist" not in snippet and len(snippet.strip().splitlines()) <= 20
    cwd.mkdir()
    assert main(["export", checkpoint, str(cwd / "model.pt"), "--format", "torchscript"]) == 0
    (cwd / "query.png").write_bytes(image.read_bytes())  # Pillow reads it by its content
    monkeypatch.chdir(cwd)
    scope: dict = {}
    exec(compile(snippet, "README snippet", "exec"), scope)  # noqa: S102 - the documented code, run as documented
    embedded = EmbeddingModel(str(cwd / "model.pt"), "cpu").embed([str(image)])
    assert embedded.ids == [str(image)]
    # one image against a batch, through the same traced graph: float32 rounding alone
    np.testing.assert_allclose(scope["embedding"].detach().numpy(), embedded.vectors[0], rtol=0, atol=1e-5)


def test_readme_snippet_applies_the_quickstart_exports_preprocessing(quickstart, tmp_path, monkeypatch):
    check_snippet_matches_embed(str(quickstart), _digit_pngs(tmp_path / "digits", 1)[0], tmp_path / "use", monkeypatch)


def _checkpoint(tmp_path: Path, data: dict, in_channels: int) -> str:
    """An untrained model's checkpoint under a config that trains on ``data``."""
    from rsk_dist.models import build_model

    config = load_config({
        "data": {**data, "image_size": 16}, "model": {"in_channels": in_channels, "dim": 8},
        "sampler": {"batch_size": 4, "samples_per_class": 2}, "train": {"chunk_size": 256},
    })
    torch.manual_seed(0)
    model = build_model("small_cnn", dim=8, in_channels=in_channels)
    save_state(tmp_path / "ckpt", {"model": model.state_dict(), "config": config.model_dump(mode="json")})
    return str(tmp_path / "ckpt")


def _image_folder(root: Path, fmt: str = "PNG") -> None:
    """Two classes of RGB images of several sizes and aspect ratios."""
    for i in range(10):
        path = root / f"class{i % 2}" / f"{i:02d}.{fmt.lower()}"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(image_bytes(i, fmt, size=(20 + 7 * i, 41 - 2 * i)))


@pytest.mark.parametrize("in_channels", [1, 3])
def test_image_files_get_the_test_time_transform_of_an_ingested_dataset(tmp_path, in_channels, monkeypatch):
    """A model trained on an ingested dataset: its images as files give exactly the vectors
    that the dataset's own reader (decoder processes, the feeder's float conversion) gives."""
    from rsk_dist.ingest import ingest

    _image_folder(tmp_path / "src", "JPEG")
    ingest(str(tmp_path / "src"), f"file://{tmp_path}/ds", "folders")
    spec = DataSource(kind="shards", url=f"file://{tmp_path}/ds", split="train")
    model = EmbeddingModel(_checkpoint(tmp_path, {"train": spec.model_dump()}, in_channels), "cpu")
    stats = (IMAGENET_MEAN, IMAGENET_STD) if in_channels == 3 else (None, None)
    assert model.preprocess == Preprocess(16, in_channels, "shorter_side_crop", False, *stats)  # type: ignore[arg-type]
    streamed = model.embed([spec])
    files = model.embed([str(tmp_path / "src")])
    assert files.ids == [f"{tmp_path}/src/{i}" for i in streamed.ids]  # the ingest's ids are the paths
    assert np.array_equal(files.vectors, streamed.vectors)
    check_snippet_matches_embed(model.url, tmp_path / "src" / "class1" / "07.jpeg", tmp_path / "use", monkeypatch)


def test_image_files_get_the_transform_of_an_image_folder_zip(tmp_path, monkeypatch):
    """A model trained on an image-folder zip (Omniglot's loader: stretched, inverted): the zip's
    images as files, and the zip itself as a path, give the vectors the zip source gives."""
    _image_folder(tmp_path / "src")
    with zipfile.ZipFile(tmp_path / "set.zip", "w") as z:
        for path in sorted((tmp_path / "src").rglob("*.png")):
            z.write(path, f"root/{path.relative_to(tmp_path / 'src')}")
    spec = DataSource(kind="zip", url=str(tmp_path / "set.zip"))
    model = EmbeddingModel(_checkpoint(tmp_path, {"train": spec.model_dump()}, 1), "cpu")
    assert model.preprocess == Preprocess(16, 1, "stretch", invert=True)
    expected = model.embed([spec]).vectors
    as_zip = model.embed([str(tmp_path / "set.zip")])
    assert as_zip.ids[0] == f"{tmp_path}/set.zip/root/class0/00.png"
    assert np.array_equal(as_zip.vectors, expected)
    assert np.array_equal(model.embed([str(tmp_path / "src")]).vectors, expected)
    check_snippet_matches_embed(model.url, tmp_path / "src" / "class0" / "04.png", tmp_path / "use", monkeypatch)


def test_embed_and_search_refuse_what_they_cannot_use(quickstart, tmp_path, capsys):
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "x.png").write_bytes(b"not an image")
    (tmp_path / "bad" / "y.pt").write_bytes(b"")
    (tmp_path / "bad" / "y.pt.preprocess.json").write_text("{}")
    cases = [
        (["embed", str(quickstart), str(tmp_path / "bad"), "--out", str(tmp_path / "o.npz")], "cannot decode image"),
        (["embed", str(quickstart), str(tmp_path / "none"), "--out", str(tmp_path / "o.npz")], "does not exist"),
        (["embed", str(tmp_path / "bad" / "x.png"), "digits:test", "--out", str(tmp_path / "o.npz")], "preprocess.json is missing"),
        (["embed", str(quickstart), "digits:test", "--out", str(tmp_path / "o.npz"), "--device", "cuda:99"], "--device"),
        (["search", str(tmp_path / "nothing.faiss"), "digits:test"], "nothing.faiss"),
        (["search", str(tmp_path / "bad" / "y.pt"), "digits:test"], "y.pt.meta.json is missing"),
        (["embed", str(tmp_path / "bad" / "y.pt"), "digits:test", "--out", str(tmp_path / "o.npz")],
         "y.pt.preprocess.json: not a preprocessing record"),
        (["eval", str(quickstart.parent / "runs"), "--data", "digits:test"], "not a complete checkpoint"),
        (["export", str(tmp_path / "bad" / "x.png"), str(tmp_path / "o.pt"), "--format", "torchscript"],
         "x.png is a file: export takes a checkpoint directory"),
    ]
    for argv, message in cases:
        assert main(argv) == 2, argv
        assert message in capsys.readouterr().err, argv


def test_a_preprocessing_record_round_trips_and_a_bad_one_is_refused():
    record = Preprocess.streamed(224, 3)
    assert json.loads(record.to_json()) == {
        "format": "rsk_dist.preprocess/1", "size": 224, "channels": 3, "resize": "shorter_side_crop",
        "invert": False, "mean": list(IMAGENET_MEAN), "std": list(IMAGENET_STD),
    }
    assert Preprocess.from_json(record.to_json()) == record
    for text, message in [
        ('{"size": 8}', "not a preprocessing record"),
        ('{"format": "rsk_dist.preprocess/1", "size": 8, "channels": 1}', "not a preprocessing record"),
        ('{"format": "rsk_dist.preprocess/1", "size": 8, "channels": 2, "resize": "stretch"}', "channels must be 1"),
        ('{"format": "rsk_dist.preprocess/1", "size": 8, "channels": 1, "resize": "stretch", "mean": [0.5]}', "mean and std"),
    ]:
        with pytest.raises(ValueError, match=message):
            Preprocess.from_json(text)
