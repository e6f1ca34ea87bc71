"""Job configs: every shipped YAML validates, mistakes name their field, and the CLI's
``validate`` reports them cleanly (exit 2, no traceback)."""
from __future__ import annotations

from pathlib import Path

import os

import pytest
import yaml


from rsk_dist.cli import main, parse_data_spec  # noqa: E402
from rsk_dist.config import ConfigError, dump_config, load_config, parse_overrides  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
JOBS = sorted((ROOT / "jobs").glob("*.yaml"))
PAPER = ("cub200_resnet50", "cars196_resnet50", "sop_resnet50", "inaturalist_resnet50",
         "vehicleid_resnet50", "sop_vit_b16", "inaturalist_vit_b16", "cars196_vit_b16", "cub200_vit_b16")

MINIMAL = {
    "data": {"train": {"kind": "digits", "split": "train"}},
    "sampler": {"batch_size": 40, "samples_per_class": 4},
}


def _tree(**changes):
    tree = yaml.safe_load(yaml.safe_dump(MINIMAL))
    for dotted, value in changes.items():
        node = tree
        *head, last = dotted.split("__")
        for key in head:
            node = node.setdefault(key, {})
        node[last] = value
    return tree


def test_all_jobs_present():
    names = {p.stem for p in JOBS}
    assert {"quickstart", "omniglot", *PAPER} <= names


@pytest.mark.parametrize("path", JOBS, ids=[p.stem for p in JOBS])
def test_every_job_validates(path):
    config = load_config(path)
    assert path.read_text().startswith("#"), "each job starts with a comment saying what it runs"
    raw = yaml.safe_load(path.read_text())
    if "lr" in raw.get("optim", {}):  # YAML 1.1 reads 1e-4 as a string: write 1.0e-4
        assert isinstance(raw["optim"]["lr"], float), f"{path.name}: optim.lr is not a YAML float"
    # the dump round-trips
    assert load_config(yaml.safe_load(dump_config(config))) == config


@pytest.mark.parametrize("name", PAPER)
def test_paper_jobs_follow_spec(name):
    spec = {  # spec §6: batch, epochs, LR (ResNet-50), LR steps, chunk, eval k
        "cub200": (400, 40, 1e-4, (10, 20, 30), 100, (1, 2, 4, 8)),
        "cars196": (392, 170, 1e-4, (80, 140), 98, (1, 2, 4, 8)),
        "sop": (4000, 55, 2e-4, (25, 50), 200, (1, 10, 100, 1000)),
        "inaturalist": (4000, 90, 1e-4, (40, 70), 200, (1, 4, 16, 32)),
        "vehicleid": (4000, 90, 1e-4, (40, 70), 200, (1, 5)),
    }
    dataset, backbone = name.split("_", 1)
    c = load_config(ROOT / "jobs" / f"{name}.yaml")
    batch, epochs, lr, steps, chunk, ks = spec[dataset]
    assert (c.sampler.batch_size, c.train.epochs, c.optim.lr_steps, c.train.eval_k) == (batch, epochs, steps, ks)
    assert c.loss.chunk_size == chunk and c.train.chunk_size == chunk
    assert c.sampler.samples_per_class == 4 and c.model.dim == 512 and c.optim.lr_gamma == 0.3
    assert c.data.image_size == 224 and c.model.pretrained is True
    assert c.scaling.use_gpu and c.scaling.num_workers in (4, 8) and c.train.autocast == "bf16"
    assert c.data.train.kind == "shards" and c.data.train.url.startswith("s3://")
    if backbone == "resnet50":
        assert (c.model.name, c.optim.name, c.optim.lr) == ("resnet50", "adam", lr)
        assert c.model.freeze_bn
    else:
        assert (c.model.name, c.optim.name) == ("vit_b_16", "adamw")
        if dataset in ("sop", "inaturalist"):
            assert c.optim.lr == 5e-5
        else:
            assert 1e-5 <= c.optim.lr <= 3e-5
    assert c.loss.simix == (dataset == "cars196")


def test_quickstart_is_small():
    c = load_config(ROOT / "jobs" / "quickstart.yaml")
    assert (c.model.name, c.model.in_channels, c.data.image_size) == ("small_cnn", 1, 8)
    assert c.data.train.kind == "digits" and c.data.eval.split == "test"
    assert c.sampler.batch_size <= 40 and c.scaling.num_workers == 1 and not c.scaling.use_gpu
    assert c.run.storage_path == "file://./runs"


def test_omniglot_excludes_shared_alphabets():
    c = load_config(ROOT / "jobs" / "omniglot.yaml")
    assert c.data.train.kind == "zip" and c.data.train.url.endswith("images_background_small1.zip")
    assert c.data.eval.url.endswith("images_background_small2.zip")
    assert set(c.data.eval.exclude_classes) == {"Greek", "Latin"}


def test_misspelt_top_level_key_names_it():
    with pytest.raises(ConfigError, match=r"samplr: unknown key"):
        load_config({**MINIMAL, "samplr": {"batch_size": 8}})


def test_misspelt_nested_key_names_dotted_path():
    with pytest.raises(ConfigError, match=r"optim\.learning_rate: unknown key"):
        load_config(_tree(optim__learning_rate=0.1))
    with pytest.raises(ConfigError, match=r"data\.train\.urll: unknown key"):
        load_config(_tree(data__train__urll="s3://x"))


def test_wrong_type_names_field():
    with pytest.raises(ConfigError) as err:
        load_config(_tree(train__epochs="many"))
    assert "train.epochs" in str(err.value) and "integer" in str(err.value)
    with pytest.raises(ConfigError, match=r"scaling\.use_gpu"):
        load_config(_tree(scaling__use_gpu="maybe"))
    with pytest.raises(ConfigError, match=r"sampler\.mode.*'epoch' or 'uniform'"):
        load_config(_tree(sampler__mode="balanced"))


def test_overrides_parse_as_yaml():
    assert parse_overrides(["a.b=3", "c=0.5", "d=[1, 2]", "e=true", "f=s3://b/x", "g=1.0e-4"]) == [
        ("a.b", 3), ("c", 0.5), ("d", [1, 2]), ("e", True), ("f", "s3://b/x"), ("g", 1e-4),
    ]
    # YAML 1.1 reads "1e-4" as a string; the float field still takes it
    assert load_config(MINIMAL, ["optim.lr=1e-4"]).optim.lr == 1e-4
    c = load_config(MINIMAL, [
        "train.epochs=7", "optim.lr=0.003", "train.eval_k=[1, 5]", "data.augment=false",
        "loss.simix=true", "run.storage_path=s3://bucket/runs",
    ])
    assert c.train.epochs == 7 and c.optim.lr == 0.003 and c.train.eval_k == (1, 5)
    assert c.data.augment is False and c.loss.simix is True and c.run.storage_path == "s3://bucket/runs"


def test_unknown_override_key_fails():
    with pytest.raises(ConfigError, match=r"train\.epoch: unknown key"):
        load_config(MINIMAL, ["train.epoch=3"])
    with pytest.raises(ConfigError, match=r"not of the form"):
        load_config(MINIMAL, ["train.epochs"])


def test_worker_counts_fixed_or_elastic():
    # Uneven shards: the batch need not be a multiple of the worker count.
    assert load_config(MINIMAL, ["scaling.num_workers=3"]).scaling.worker_range == (3, 3)
    assert load_config(MINIMAL, ["scaling.num_workers=[1, 4]"]).scaling.worker_range == (1, 4)
    for bad in ("0", "[2, 1]", "[0, 2]"):
        with pytest.raises(ConfigError, match=r"scaling\.num_workers"):
            load_config(MINIMAL, [f"scaling.num_workers={bad}"])


def test_data_spec_parsing():
    assert parse_data_spec("shards:s3://b/cub200:test").model_dump(include={"kind", "url", "split"}) == {
        "kind": "shards", "url": "s3://b/cub200", "split": "test"}
    assert parse_data_spec("shards:s3://b/cub200").split is None
    assert parse_data_spec("digits:test").split == "test"
    assert parse_data_spec("zip:x.zip", exclude=["Greek"]).exclude_classes == ("Greek",)
    with pytest.raises(ConfigError):
        parse_data_spec("tfrecord:s3://b")


# --- the CLI ------------------------------------------------------------------------------


def test_cli_validate_ok(capsys):
    assert main(["validate", str(ROOT / "jobs" / "quickstart.yaml"), "--set", "train.epochs=2"]) == 0
    out, err = capsys.readouterr()
    assert yaml.safe_load(out)["train"]["epochs"] == 2
    assert "valid job config" in err


def test_cli_validate_bad_key_exit_2(capsys, tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump({**MINIMAL, "optim": {"lr": 0.1, "momentun": 0.9}}))
    assert main(["validate", str(bad)]) == 2
    out, err = capsys.readouterr()
    assert out == ""
    assert "optim.momentun: unknown key" in err and "Traceback" not in err
    assert err.startswith("rsk-dist validate: error:")


def test_cli_validate_bad_override_and_missing_file(capsys, tmp_path):
    assert main(["validate", str(ROOT / "jobs" / "quickstart.yaml"), "--set", "scaling.num_workers=0"]) == 2
    assert "scaling.num_workers" in capsys.readouterr().err
    assert main(["validate", str(tmp_path / "nope.yaml")]) == 2
    err = capsys.readouterr().err
    assert "does not exist" in err and "Traceback" not in err
    (tmp_path / "list.yaml").write_text("- 1\n- 2\n")
    assert main(["validate", str(tmp_path / "list.yaml")]) == 2
    assert "mapping" in capsys.readouterr().err


def test_cli_usage_errors_exit_2(capsys):
    with pytest.raises(SystemExit) as exc:
        main(["ingest", "src", "s3://b/x", "--layout", "imagenet"])
    assert exc.value.code == 2
    with pytest.raises(SystemExit) as exc:
        main([])
    assert exc.value.code == 2



def test_cli_output_into_a_closed_pipe_ends_quietly():
    """``rsk-dist validate ... | head -c 1``: the reader closes the pipe before the resolved config
    is written, and the command ends with 141 (SIGPIPE's status) and no traceback."""
    import subprocess
    import sys

    read, write = os.pipe()
    os.close(read)  # a reader that has already gone
    try:
        run = subprocess.run([sys.executable, "-m", "rsk_dist.cli", "validate", str(ROOT / "jobs" / "quickstart.yaml")],
                             stdout=write, stderr=subprocess.PIPE, text=True, timeout=300)
    finally:
        os.close(write)
    assert "Traceback" not in run.stderr and "BrokenPipe" not in run.stderr, run.stderr
    assert run.returncode == 141

def test_cli_submit_bad_config_submits_nothing(capsys, monkeypatch):
    """A bad config fails before any client is made, so no address is even contacted."""
    import rsk_dist.cli.jobs as cli

    def no_client(args):
        raise AssertionError("a bad config must not reach the job server")

    monkeypatch.setattr(cli, "_client", no_client)
    code = main(["submit", str(ROOT / "jobs" / "quickstart.yaml"), "--set", "train.epoch=1",
                 "--address", "http://127.0.0.1:9"])
    assert code == 2
    assert "train.epoch: unknown key" in capsys.readouterr().err


@pytest.mark.parametrize("share", ["0.5", "0", "2"])
def test_gpu_share_other_than_one_is_refused_before_any_worker_starts(share, capsys, monkeypatch):
    """0.5 puts two ranks on one GPU (NCCL refuses), 0 gives NCCL CPU tensors, 2 idles a GPU."""
    import rsk_dist.train

    def no_fit(*args, **kwargs):
        raise AssertionError("a bad config must not reach the cluster")

    monkeypatch.setattr(rsk_dist.train, "fit", no_fit)
    gpu = ["--set", "scaling.use_gpu=true", "--set", f"scaling.gpus_per_worker={share}"]
    for command in ("validate", "train"):
        assert main([command, str(ROOT / "jobs" / "quickstart.yaml"), *gpu]) == 2
        err = capsys.readouterr().err
        assert "scaling.gpus_per_worker must be 1 with scaling.use_gpu" in err, err
        assert "set scaling.gpus_per_worker=1" in err and "Traceback" not in err
    # The share is only checked where it is used: one whole GPU, or no GPU at all.
    assert main(["validate", str(ROOT / "jobs" / "quickstart.yaml"), "--set", "scaling.use_gpu=true"]) == 0
    assert main(["validate", str(ROOT / "jobs" / "quickstart.yaml"), "--set", f"scaling.gpus_per_worker={share}"]) == 0


def test_build_submission_carries_no_secrets(tmp_path, monkeypatch):
    import rsk_dist.cli.jobs as cli

    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "do-not-ship-me")
    monkeypatch.setenv("RAY_AUTH_TOKEN", "token-do-not-ship")
    monkeypatch.delenv("RAY_AUTH_TOKEN_PATH", raising=False)
    config = load_config(ROOT / "jobs" / "quickstart.yaml", ["train.epochs=1"])
    entrypoint, env = cli.build_submission(config, ["train.epochs=1"], tmp_path)
    assert entrypoint == "python -m rsk_dist.cli train job.yaml --address auto --set train.epochs=1"
    assert "env_vars" not in env
    assert env["working_dir"] == str(tmp_path) and Path(env["py_modules"][0]).name == "rsk_dist"
    assert load_config(tmp_path / "job.yaml") == config
    text = repr(env) + entrypoint + (tmp_path / "job.yaml").read_text()
    assert "do-not-ship" not in text
    assert cli._auth_headers() == {"Authorization": "Bearer token-do-not-ship"}
    monkeypatch.delenv("RAY_AUTH_TOKEN")
    assert cli._auth_headers() == {}


KEY, SECRET = "AKIAEXAMPLEKEY", "wJalrXUtnFEMI-example-secret"
CREDENTIAL_URL = f"s3://{KEY}:{SECRET}@bucket/prefix"


@pytest.mark.parametrize("field", ["run__storage_path", "run__resume_from", "data__train__url"])
def test_config_with_a_credential_url_is_refused(field, tmp_path):
    changes = {field: CREDENTIAL_URL}
    if field == "data__train__url":
        changes["data__train__kind"] = "shards"
    path = tmp_path / "job.yaml"
    path.write_text(yaml.safe_dump(_tree(**changes)))
    with pytest.raises(ConfigError) as err:
        load_config(path)
    msg = str(err.value)
    assert field.replace("__", ".") in msg and "AWS_ACCESS_KEY_ID" in msg and "AWS_PROFILE" in msg
    assert KEY not in msg and SECRET not in msg and "s3://***@bucket/prefix" in msg
    with pytest.raises(ConfigError, match="credentials inside the URL"):  # through --set too
        load_config(_tree(), [f"{field.replace('__', '.')}={CREDENTIAL_URL}"] + (
            ["data.train.kind=shards"] if field == "data__train__url" else []))


@pytest.mark.parametrize(
    "argv",
    [
        ["ingest", "src", CREDENTIAL_URL, "--layout", "folders"],
        ["gc-dataset", f"s3://{KEY}@bucket/prefix"],
        ["eval", "file:///tmp/ckpt", "--data", f"shards:{CREDENTIAL_URL}:test"],
        ["train", "job.yaml", "--resume-from", CREDENTIAL_URL],
        ["export", CREDENTIAL_URL, "out.pt", "--format", "torchscript"],
        ["status", "raysubmit_x", "--address", f"http://{KEY}:{SECRET}@head:8265"],
    ],
)
def test_cli_refuses_credential_urls_while_parsing(argv, capsys):
    with pytest.raises(SystemExit) as exc:
        main(argv)
    err = capsys.readouterr().err
    assert exc.value.code == 2 and "credentials inside the URL" in err and "AWS_ACCESS_KEY_ID" in err
    assert KEY not in err and SECRET not in err


# --- the CLI's commands on real modules ----------------------------------------------------


def test_relative_local_paths_become_absolute(monkeypatch, tmp_path):
    from rsk_dist.config import absolutize_paths

    monkeypatch.chdir(tmp_path)
    c = absolutize_paths(load_config(ROOT / "jobs" / "omniglot.yaml", ["run.storage_path=file://./runs", "run.resume_from=runs/x"]))
    assert c.run.storage_path == f"file://{tmp_path}/runs"
    assert c.run.resume_from == str(tmp_path / "runs" / "x")
    assert os.path.isabs(c.data.train.url)
    s3 = absolutize_paths(load_config(ROOT / "jobs" / "sop_resnet50.yaml"))
    assert s3.data.train.url.startswith("s3://"), "remote URLs are left alone"


def test_cli_eval_of_a_real_checkpoint(capsys, tmp_path):
    import torch

    from rsk_dist.checkpoint import save_state
    from rsk_dist.train import Trainer

    config = load_config({
        "data": {"train": {"kind": "digits", "split": "train"}, "image_size": 8},
        "model": {"in_channels": 1, "dim": 16}, "sampler": {"batch_size": 40},
        "train": {"epochs": 1, "steps_per_epoch": 1, "chunk_size": 40},
        "run": {"storage_path": f"file://{tmp_path}/runs"},  # rank 0 writes its TensorBoard events there
    })
    trainer = Trainer(config, torch.device("cpu"))
    trainer.run(lambda metrics, state: None)
    save_state(tmp_path / "ckpt", trainer.state())
    assert main(["eval", str(tmp_path / "ckpt"), "--data", "digits:test", "--k", "1", "5"]) == 0
    out = capsys.readouterr().out
    recall = float(out.split("recall@1:")[1].split()[0])
    assert 0.1 < recall <= 1.0
    assert main(["eval", str(tmp_path / "nothing"), "--data", "digits:test"]) == 2
    assert "nothing does not exist: pass a checkpoint directory" in capsys.readouterr().err
    assert main(["eval", "x", "--data", "parquet:s3://b"]) == 2
    assert "--data 'parquet:s3://b'" in capsys.readouterr().err

    # The VehicleID and Revisited Oxford/Paris protocols, against the metric functions directly.
    import json

    from rsk_dist.checkpoint import load_model
    from rsk_dist.data.sources import digits_split
    from rsk_dist.evaluate import embed_source
    from rsk_dist.metrics import revisited_map, vehicleid_metrics

    model, _ = load_model(str(tmp_path / "ckpt"))
    emb, labels = embed_source(model, digits_split("test"), chunk_size=40)
    expected = vehicleid_metrics(emb, labels, ks=(1, 5), generator=torch.Generator().manual_seed(0))
    assert main(["eval", str(tmp_path / "ckpt"), "--data", "digits:test", "--protocol", "vehicleid", "--k", "1", "5"]) == 0
    assert f"recall@1: {expected['recall@1']:.4f}" in capsys.readouterr().out
    gnd = []
    for i in range(0, 60, 3):  # every third test image queries the whole test set; itself is junk
        same = [j for j in range(len(labels)) if labels[j] == labels[i] and j != i]
        gnd.append({"easy": same[::2], "hard": same[1::2], "junk": [i]})
    (tmp_path / "gnd.json").write_text(json.dumps({"gnd": gnd}))
    expected = revisited_map(emb[0:60:3], emb, gnd)
    # The queries as a source of their own: the first 60 test images, every third one.
    assert main(["eval", str(tmp_path / "ckpt"), "--data", "digits:test", "--protocol", "revisited",
                 "--queries", "digits:test", "--ground-truth", str(tmp_path / "gnd.json")]) == 2
    assert "queries but ground truth for 20" in capsys.readouterr().err
    (tmp_path / "gnd_all.json").write_text(json.dumps([
        {"easy": [j for j in range(len(labels)) if labels[j] == labels[i] and j != i], "hard": [], "junk": [i]}
        for i in range(len(labels))
    ]))
    assert main(["eval", str(tmp_path / "ckpt"), "--data", "digits:test", "--protocol", "revisited",
                 "--queries", "digits:test", "--ground-truth", str(tmp_path / "gnd_all.json")]) == 0
    out = capsys.readouterr().out
    full = revisited_map(emb, emb, json.loads((tmp_path / "gnd_all.json").read_text()))
    assert f"medium: {full['medium']:.4f}" in out
    assert 0 < expected["medium"] <= 1
    assert main(["eval", str(tmp_path / "ckpt"), "--data", "digits:test", "--protocol", "revisited",
                 "--queries", "digits:test", "--ground-truth", str(tmp_path / "gnd.pkl")]) == 2
    assert "pickled ground truth" in capsys.readouterr().err


def test_cli_ingest_of_a_folder_tree(capsys, tmp_path):
    from PIL import Image

    for c in range(3):
        (tmp_path / "src" / f"class{c}").mkdir(parents=True)
        for i in range(2):
            Image.new("L", (6, 6), 40 * c + i).save(tmp_path / "src" / f"class{c}" / f"{i}.png")
    target = f"file://{tmp_path}/ds"
    assert main(["ingest", str(tmp_path / "src"), target, "--layout", "folders"]) == 0
    assert "num_images: 6" in capsys.readouterr().out
    assert list((tmp_path / "ds").glob("shards/*/index.parquet")) and (tmp_path / "ds" / "_SUCCESS").exists()


def test_cli_export_index_without_faiss_is_clean(capsys, monkeypatch):
    import rsk_dist.cli.model as cli

    monkeypatch.setattr(cli, "importable", lambda module: module != "faiss")
    assert main(["export-index", "file:///nope", "--data", "digits:test", "/tmp/x.faiss"]) == 2
    err = capsys.readouterr().err
    assert "needs faiss" in err and "Traceback" not in err


def test_overrides_leave_the_callers_dict_alone():
    tree = _tree()
    before = yaml.safe_dump(tree)
    assert load_config(tree, ["sampler.seed=7"]).sampler.seed == 7
    assert yaml.safe_dump(tree) == before


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> str:
    """A small ingested dataset (3 classes of 4 images, split train) on local files."""
    from rsk_dist.ingest import ingest
    from tests.test_shards import make_folders

    root = tmp_path_factory.mktemp("shards")
    make_folders(root / "src", classes=3)
    ingest(str(root / "src"), str(root / "ds"), "folders")
    return str(root / "ds")


ON_SHARDS = ["sampler.batch_size=8", "data.eval=null", "model.in_channels=3"]


@pytest.mark.parametrize("overrides,field", [
    (["sampler.seed=-1"], "sampler.seed"),
    (["sampler.seed=100000000000000000000000"], "sampler.seed"),  # 1e23 as an integer
    (["train.eval_k=[0]"], "train.eval_k"),
    (["train.eval_k=[-3]"], "train.eval_k"),
    (["sampler.batch_size=100000000000000000000"], "sampler.batch_size"),  # 1e20
    (["optim.lr=.inf"], "optim.lr"),
    (["loss.tau2=1.0e-300"], "loss.tau2"),
    (["sampler.batch_size=44"], "sampler.batch_size"),  # digits: 11 classes of 4 wanted, 10 there
    (["data.train={kind: zip, url: /no/such/images.zip}"], "data.train.url"),
    (["data.train={kind: shards, url: SHARDS, split: train, exclude_classes: [class0, class1, class2]}", *ON_SHARDS],
     "data.train.exclude_classes"),
    (["data.train={kind: shards, url: SHARDS, split: validation}", *ON_SHARDS], "data.train: split 'validation'"),
    (["data.train={kind: shards, url: SHARDS_MISSING, split: train}", *ON_SHARDS], "data.train"),
    (["data.train={kind: shards, url: SHARDS, split: train}", "sampler.batch_size=16", "data.eval=null"],
     "sampler.batch_size"),  # 4 classes of 4 wanted, 3 there
])
def test_validate_refuses_what_workers_would_fail_on_naming_the_field(capsys, shards, overrides, field):
    """Issue 23, finding 10: each of these passed validate and failed inside the workers."""
    overrides = [o.replace("SHARDS_MISSING", shards + "-missing").replace("SHARDS", shards) for o in overrides]
    assert main(["validate", str(ROOT / "jobs" / "quickstart.yaml"), *sum((["--set", o] for o in overrides), [])]) == 2
    out, err = capsys.readouterr()
    assert field in err and "Traceback" not in err and out == "", err


def test_float64_with_a_teacher_is_refused():
    with pytest.raises(ConfigError, match="model.dtype float64 .* not supported with a teacher"):
        load_config(_tree(model__dtype="float64", loss__asymmetric=True, teacher__checkpoint="/x/ckpt"))
