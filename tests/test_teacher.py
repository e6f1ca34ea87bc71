"""The frozen teacher of asymmetric training: the step's gradient with it, the Trainer leaving it
bit for bit unchanged, its config checks (before any worker starts) and three-setting evaluation."""
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from rsk_dist.checkpoint import save_state
from rsk_dist.config import ConfigError, load_config
from rsk_dist.engine import LargeBatchStep
from rsk_dist.evaluate import evaluate
from rsk_dist.losses import MetricLearningLoss, RecallAtKSurrogate, Regression
from rsk_dist.models import build_model
from rsk_dist.teacher import TeacherCache, freeze, load_teacher
from rsk_dist.train import Trainer, fit


class Net(nn.Module):
    def __init__(self, width: int) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Linear(12, width), nn.Tanh(), nn.Dropout(0.2), nn.Linear(width, 6))

    def forward(self, x):
        return F.normalize(self.body(x), dim=1)


@pytest.mark.parametrize("loss", [
    RecallAtKSurrogate(k=(1, 2, 4), tau2=0.05, simix=True, asymmetric=True),
    MetricLearningLoss("contrastive", asymmetric=True, pos_margin=0.3, neg_margin=1.3),
    Regression(),
], ids=["rsk_simix", "contr_plus", "regression"])
def test_two_pass_step_with_a_teacher_equals_one_full_backward(loss):
    torch.manual_seed(0)
    student, teacher = Net(16).double(), freeze(Net(24).double())
    images = torch.randn(20, 12, dtype=torch.float64)
    labels = torch.tensor([3, 0, 2, 3, 1, 0, 3, 4, 1, 3, 0, 2, 3, 1, 5, 2, 2, 0, 4, 3])
    torch.manual_seed(1)  # dropout: the step replays each chunk's randomness; one forward draws the same
    result = LargeBatchStep(student, loss, chunk_size=7, teacher=teacher).step(images, labels, torch.Generator().manual_seed(2))
    got = [p.grad.clone() for p in student.parameters()]
    student.zero_grad()
    torch.manual_seed(1)
    emb = torch.cat([student(c) for c in images.split(7)])
    expected = loss(emb, labels, torch.Generator().manual_seed(2), gallery=teacher(images))
    expected.backward()
    assert result.loss == pytest.approx(expected.item(), rel=1e-12)
    assert "teacher_s" in result.timings
    for g, p in zip(got, student.parameters()):
        torch.testing.assert_close(g, p.grad, rtol=1e-9, atol=1e-12)
    assert all(p.grad is None for p in teacher.parameters())


def test_freeze_keeps_a_teacher_in_eval_without_gradients():
    teacher = freeze(Net(8))
    teacher.train()
    assert not teacher.training and not any(m.training for m in teacher.modules())
    assert not any(p.requires_grad for p in teacher.parameters())


def job(tmp_path, **overrides):
    tree = {
        "data": {"train": {"kind": "digits", "split": "train"}, "eval": {"kind": "digits", "split": "test"}, "image_size": 8},
        "model": {"in_channels": 1, "dim": 32, "width": 16},
        "loss": {"k": [1, 2, 4], "tau2": 0.05},
        "sampler": {"batch_size": 40, "seed": 3},
        "train": {"epochs": 1, "steps_per_epoch": 2, "chunk_size": 16},
        "run": {"name": "t", "storage_path": f"file://{tmp_path}/runs"},
    }
    for dotted, value in overrides.items():
        section, field = dotted.split("__")
        tree.setdefault(section, {})[field] = value
    return tree


def teacher_checkpoint(tmp_path, dim: int = 32) -> tuple[str, dict]:
    """A trained-looking teacher: a small CNN of another width, saved as an rsk_dist checkpoint."""
    torch.manual_seed(7)
    model = build_model("small_cnn", dim=dim, in_channels=1, width=24)
    state = {"model": model.state_dict(),
             "config": load_config(job(tmp_path, model__dim=dim, model__width=24)).model_dump(mode="json"),
             "epoch": 1, "step": 0}
    save_state(tmp_path / "teacher", state)
    return str(tmp_path / "teacher"), state


@pytest.mark.parametrize("loss", [
    {"name": "rsk", "simix": True}, {"name": "contrastive", "asymmetric_self_positive": False}, {"name": "regression"},
], ids=["rsk_simix", "contr", "regression"])
def test_training_leaves_the_teacher_bit_for_bit_unchanged_and_evaluates_three_settings(tmp_path, loss):
    url, saved = teacher_checkpoint(tmp_path)
    tree = job(tmp_path, teacher__checkpoint=url)
    tree["loss"] = {**tree["loss"], **loss, "asymmetric": True}
    trainer = Trainer(load_config(tree), torch.device("cpu"))
    initial = {k: v.clone() for k, v in trainer.model.state_dict().items()}
    reports = []
    trainer.run(lambda metrics, state: reports.append(metrics))
    for name, value in trainer.teacher.state_dict().items():
        assert torch.equal(value, saved["model"][name]), name
    assert all(p.grad is None and not p.requires_grad for p in trainer.teacher.parameters())
    assert not trainer.teacher.training
    assert any(not torch.equal(v, initial[k]) for k, v in trainer.model.state_dict().items()), "the student trains"
    metrics = reports[-1]
    teacher, _ = load_teacher(load_config(tree).teacher)
    expected = evaluate(trainer.model, trainer.eval_data, ks=(1, 2, 4, 8), chunk_size=16, teacher=teacher)
    for key in ("recall@1", "map@r", "asymmetric_recall@1", "asymmetric_map@r", "teacher_recall@1", "teacher_map@r"):
        assert metrics[key] == expected[key], key
    assert metrics["asymmetric_recall@1"] != metrics["recall@1"]


def test_asymmetric_config_checks(tmp_path):
    with pytest.raises(ConfigError, match="needs a teacher section"):
        load_config(job(tmp_path, loss__asymmetric=True))
    with pytest.raises(ConfigError, match="set loss.asymmetric: true"):
        load_config(job(tmp_path, teacher__checkpoint="/x"))
    with pytest.raises(ConfigError, match="regression"):
        load_config(job(tmp_path, loss__name="regression"))
    with pytest.raises(ConfigError, match="exactly one"):
        load_config(job(tmp_path, loss__asymmetric=True, teacher__checkpoint="/x", teacher__model={"pretrained": "/y"}))
    bad_dim = {"name": "small_cnn", "in_channels": 1, "dim": 64, "pretrained": "/y"}
    with pytest.raises(ConfigError, match="64-d but model.dim is 32: set model.dim: 64"):
        load_config(job(tmp_path, loss__asymmetric=True, teacher__model=bad_dim))


def test_a_teacher_checkpoint_of_another_dim_is_refused_before_workers_start(tmp_path):
    import ray

    url, _ = teacher_checkpoint(tmp_path, dim=16)
    config = load_config(job(tmp_path, loss__asymmetric=True, teacher__checkpoint=url))
    with pytest.raises(ValueError, match="16-d but model.dim is 32"):
        fit(config)
    assert not ray.is_initialized()


def test_a_backbone_teacher_from_a_local_state_dict_is_the_same_on_every_load(tmp_path):
    torch.manual_seed(0)
    backbone = build_model("small_cnn", dim=32, in_channels=1, width=16).backbone
    torch.save(backbone.state_dict(), tmp_path / "backbone.pt")
    model = {"name": "small_cnn", "in_channels": 1, "dim": 32, "width": 16, "pretrained": str(tmp_path / "backbone.pt")}
    config = load_config(job(tmp_path, loss__asymmetric=True, teacher__model=model)).teacher
    (a, _), (b, _) = load_teacher(config), load_teacher(config)
    for (name, x), y in zip(a.state_dict().items(), b.state_dict().values()):
        assert torch.equal(x, y), name
    assert torch.equal(a.backbone.state_dict()["features.0.weight"], backbone.state_dict()["features.0.weight"])


class CountingNet(Net):
    """A teacher that counts the rows it embeds."""

    def __init__(self, width: int) -> None:
        super().__init__(width)
        self.rows = 0

    def forward(self, x):
        self.rows += x.shape[0]
        return super().forward(x)


def test_the_teacher_cache_embeds_each_sample_once_and_changes_nothing():
    torch.manual_seed(0)
    student, teacher = Net(16).double(), freeze(CountingNet(24).double())
    images = torch.randn(30, 12, dtype=torch.float64)  # sample i's (unaugmented) image
    labels = torch.tensor([i % 6 for i in range(30)])
    loss = RecallAtKSurrogate(k=(1, 2), tau2=0.05, simix=True, asymmetric=True)
    cached = LargeBatchStep(student, loss, chunk_size=7, teacher=teacher, teacher_cache=TeacherCache(30))
    plain = LargeBatchStep(student, loss, chunk_size=7, teacher=teacher)
    embedded = []
    for ids in (torch.arange(0, 20), torch.arange(10, 30), torch.tensor([3, 29, 3, 17, 0, 8, 25, 11])):
        before = teacher.rows
        got = cached.embed_teacher(images[ids], ids)
        embedded.append(teacher.rows - before)
        torch.testing.assert_close(got, teacher(images[ids]), rtol=0, atol=1e-15)
        # The step's gradient with the cache is the gradient without it.
        grads = []
        for step in (cached, plain):
            student.zero_grad()
            torch.manual_seed(1)
            step.step(images[ids], labels[ids], torch.Generator().manual_seed(2), ids=ids)
            grads.append([p.grad.clone() for p in student.parameters()])
        for a, b in zip(*grads):
            torch.testing.assert_close(a, b, rtol=0, atol=1e-15)
    assert embedded == [20, 10, 0]  # new samples only, then none
    assert cached.teacher_cache.last_hit_rate == 1.0
    with pytest.raises(ValueError, match="needs the batch's sample ids"):
        cached.step(images, labels)


def test_a_student_maps_into_a_wider_teacher_only_when_declared(tmp_path):
    wide = {"name": "small_cnn", "in_channels": 1, "dim": 48, "pretrained": "/y"}
    with pytest.raises(ConfigError, match="48-d but model.dim is 32: set model.dim: 48 .* or declare teacher.map: linear"):
        load_config(job(tmp_path, loss__asymmetric=True, teacher__model=wide))
    config = load_config(job(tmp_path, loss__asymmetric=True, teacher__model=wide, teacher__map="linear"))
    assert config.teacher.map == "linear"
    with pytest.raises(ConfigError, match="a checkpoint, an export or a model: exactly one"):
        load_config(job(tmp_path, loss__asymmetric=True, teacher__checkpoint="/x", teacher__export="/y.pt"))
    with pytest.raises(ConfigError, match="cache_embeddings .* set data.augment: false"):
        load_config(job(tmp_path, loss__asymmetric=True, teacher__checkpoint="/x", teacher__cache_embeddings=True))


def export_teacher(tmp_path, dim: int) -> str:
    """A teacher checkpoint exported as TorchScript by ``rsk-dist export`` (with its preprocessing record)."""
    from rsk_dist.cli import main

    url, _ = teacher_checkpoint(tmp_path, dim=dim)
    out = str(tmp_path / "teacher.pt")
    assert main(["export", url, out, "--format", "torchscript"]) == 0
    return out


def test_a_student_learns_a_map_into_an_exported_teachers_space_with_cached_teacher_embeddings(tmp_path, capsys):
    from rsk_dist.checkpoint import load_model
    from rsk_dist.cli import main
    from rsk_dist.index import load_export
    from rsk_dist.teacher import TeacherSpaceMap

    export = export_teacher(tmp_path, dim=48)
    exported, _ = load_export(export)
    saved = {k: v.clone() for k, v in exported.state_dict().items()}
    tree = job(tmp_path, teacher__export=export, teacher__map="linear", teacher__cache_embeddings=True, data__augment=False)
    tree["loss"]["asymmetric"] = True
    tree["train"].update(epochs=2, eval_every=1)
    trainer = Trainer(load_config(tree), torch.device("cpu"))
    assert isinstance(trainer.model, TeacherSpaceMap) and trainer.model.map.weight.shape == (48, 32)
    reports = []
    trainer.run(lambda metrics, state: reports.append((metrics, state)))
    for name, value in trainer.teacher.state_dict().items():
        assert torch.equal(value, saved[name]), name
    trainer.teacher.train()
    assert not trainer.teacher.training and not any(p.requires_grad for p in trainer.teacher.parameters())
    # Each sample in the first step was embedded by the teacher once; later batches reuse them.
    cache = trainer.step.teacher_cache
    assert cache.hits > 0 and cache.misses == int(cache.known.sum()) <= len(trainer.train_data.labels)
    metrics, state = reports[-1]
    assert {"asymmetric_recall@1", "teacher_recall@1", "recall@1"} <= metrics.keys()
    # The student's checkpoint loads with its map, and exports to teacher-dim embeddings.
    ckpt = tmp_path / "student"
    save_state(ckpt, state)
    model, _ = load_model(str(ckpt))
    assert model(torch.zeros(2, 1, 8, 8)).shape == (2, 48)
    capsys.readouterr()
    assert main(["export", str(ckpt), str(tmp_path / "student.pt"), "--format", "torchscript"]) == 0
    assert "(48-d," in capsys.readouterr().out
    student, _ = load_export(str(tmp_path / "student.pt"))
    x = torch.rand(3, 1, 8, 8)
    torch.testing.assert_close(student(x), model(x), rtol=0, atol=1e-6)
    # eval --gallery-model takes the teacher's export as it takes its checkpoint.
    capsys.readouterr()
    assert main(["eval", str(ckpt), "--data", "digits:test", "--gallery-model", export]) == 0
    shown = capsys.readouterr().out
    for key in ("recall@1", "asymmetric_recall@1", "teacher_recall@1", "teacher_map@r"):
        assert key in shown, key


def test_a_teacher_that_does_not_fit_the_job_is_refused_before_any_worker_starts(tmp_path):
    import json

    import ray

    from rsk_dist.prestart import check_data

    export = export_teacher(tmp_path, dim=16)
    config = load_config(job(tmp_path, loss__asymmetric=True, teacher__export=export))
    with pytest.raises(ValueError, match="16-d but model.dim is 32: set model.dim: 16 .* teacher.map: linear"):
        fit(config)
    assert not ray.is_initialized()
    missing = load_config(job(tmp_path, loss__asymmetric=True, teacher__checkpoint=str(tmp_path / "nothing")))
    with pytest.raises(ValueError, match="teacher.checkpoint: .*nothing does not exist: pass a checkpoint directory"):
        check_data(missing)
    record = json.loads((tmp_path / "teacher.pt.preprocess.json").read_text())
    (tmp_path / "teacher.pt.preprocess.json").write_text(json.dumps({**record, "invert": True}))
    config = load_config(job(tmp_path, loss__asymmetric=True, teacher__export=export, teacher__map="linear"))
    with pytest.raises(ValueError, match="prepared otherwise than this job's: it expects .*invert True.* gives .*invert False"):
        check_data(config)
    (tmp_path / "teacher.pt.preprocess.json").unlink()
    with pytest.raises(ValueError, match="teacher.export: .*preprocess.json is missing"):
        check_data(config)
