import copy
import pickle
import subprocess
import sys
import urllib.request
import warnings

import pytest
import torch
from torch import nn

from rsk_dist.models import (
    EmbeddingModel,
    GeM,
    SmallCNN,
    build_model,
    freeze_batchnorm,
    warn_if_batchnorm_updates,
)


def bn_net() -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.Flatten(), nn.LazyLinear(4))


@pytest.mark.parametrize("in_channels,size", [(1, 8), (1, 28), (3, 28), (3, 64), (1, 64)])
def test_small_cnn_shapes_and_unit_norm(in_channels, size):
    torch.manual_seed(0)
    model = build_model("small_cnn", dim=32, in_channels=in_channels)
    out = model(torch.rand(5, in_channels, size, size))
    assert out.shape == (5, 32)
    torch.testing.assert_close(out.norm(dim=1), torch.ones(5))
    assert not any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules())


def test_small_cnn_default_dim_and_backprop():
    model = build_model("small_cnn", in_channels=1)
    out = model(torch.rand(3, 1, 28, 28))
    assert out.shape == (3, 512)
    out.sum().backward()
    assert model.gem.p.grad is not None and torch.isfinite(model.gem.p.grad)
    assert all(p.grad is not None for p in model.backbone.parameters())


def test_small_cnn_dropout_makes_forward_random_in_train_mode():
    model = build_model("small_cnn", dim=16, in_channels=1, dropout=0.5)
    x = torch.rand(4, 1, 28, 28)
    model.train()
    assert not torch.allclose(model(x), model(x))
    torch.manual_seed(3)
    a = model(x)
    torch.manual_seed(3)
    torch.testing.assert_close(model(x), a)  # randomness replays from the RNG state
    model.eval()
    torch.testing.assert_close(model(x), model(x))


def test_gem_with_p1_equals_average_pooling():
    x = torch.rand(4, 6, 5, 7, dtype=torch.float64) + 0.01
    gem = GeM(p=1.0).double()
    torch.testing.assert_close(gem(x), x.mean(dim=(2, 3)), rtol=1e-12, atol=1e-12)
    # and with the default p = 3 it is a different (larger) mean
    assert (GeM().double()(x) > x.mean(dim=(2, 3)) + 1e-6).all()


def test_embedding_model_gem_p1_matches_avg_model():
    torch.manual_seed(0)
    gem_model = build_model("small_cnn", dim=16, pooling="gem", in_channels=1)
    avg_model = build_model("small_cnn", dim=16, pooling="avg", in_channels=1)
    avg_model.load_state_dict({k: v for k, v in gem_model.state_dict().items() if not k.startswith("gem.")})
    with torch.no_grad():
        gem_model.gem.p.fill_(1.0)
    x = torch.rand(3, 1, 28, 28)
    # features after ReLU + maxpool are >= 0; GeM clamps at eps=1e-6, hence the tolerance
    torch.testing.assert_close(gem_model(x), avg_model(x), rtol=1e-4, atol=1e-5)


def test_token_pooling():
    tokens = torch.randn(2, 5, 8)
    cls = EmbeddingModel(nn.Identity(), 8, dim=4, pooling="cls")
    avg = EmbeddingModel(nn.Identity(), 8, dim=4, pooling="avg")
    torch.testing.assert_close(cls.pool(tokens), tokens[:, 0])
    torch.testing.assert_close(avg.pool(tokens), tokens.mean(1))
    with pytest.raises(ValueError, match="GeM"):
        EmbeddingModel(nn.Identity(), 8, dim=4, pooling="gem").pool(tokens)


def test_build_model_rejects_bad_arguments():
    with pytest.raises(ValueError, match="unknown model"):
        build_model("resnet18")
    with pytest.raises(ValueError, match="pooling"):
        build_model("small_cnn", pooling="cls")
    with pytest.raises(ValueError, match="pooling"):
        build_model("vit_b_16", pooling="gem")
    with pytest.raises(ValueError, match="in_channels"):
        build_model("resnet50", in_channels=1)
    with pytest.raises(ValueError, match="local state-dict"):
        build_model("small_cnn", pretrained=True)


def test_small_cnn_pretrained_from_local_file(tmp_path):
    src = SmallCNN(in_channels=1)
    torch.save(src.state_dict(), tmp_path / "w.pt")
    model = build_model("small_cnn", in_channels=1, pretrained=str(tmp_path / "w.pt"))
    torch.testing.assert_close(model.backbone.features[0].weight, src.features[0].weight)
    with pytest.raises(FileNotFoundError, match="missing.pt"):
        build_model("small_cnn", pretrained=str(tmp_path / "missing.pt"))


def test_freeze_batchnorm_keeps_running_stats_and_affine_grads():
    torch.manual_seed(0)
    net = bn_net()
    net(torch.randn(2, 3, 6, 6))  # materialise the lazy layer
    bn = net[1]
    bn.running_mean.fill_(0.5)
    bn.running_var.fill_(2.0)
    before = {k: v.clone() for k, v in bn.state_dict().items()}
    assert freeze_batchnorm(net) is net
    net.train()  # must not switch the frozen BN back to training mode
    assert net.training and not bn.training
    out = net(torch.randn(8, 3, 6, 6) * 3 + 1)
    out.sum().backward()
    for k, v in bn.state_dict().items():
        torch.testing.assert_close(v, before[k], msg=f"BatchNorm {k} changed")
    assert bn.weight.requires_grad and bn.weight.grad is not None and bn.weight.grad.abs().sum() > 0
    assert bn.bias.grad is not None and bn.bias.grad.abs().sum() > 0
    # it normalises with the frozen statistics, as eval mode does
    x = torch.randn(4, 8, 3, 3)
    torch.testing.assert_close(bn(x), (x - 0.5) / torch.sqrt(torch.tensor(2.0) + bn.eps))
    # forced back even if someone sets training by hand
    bn.training = True
    bn(x)
    torch.testing.assert_close(bn.running_mean, before["running_mean"])


def test_unfrozen_batchnorm_does_update_running_stats():
    # the control for the test above: without freezing, the same forward changes the statistics
    net = bn_net()
    net.train()
    before = net[1].running_mean.clone()
    net(torch.randn(8, 3, 6, 6) * 3 + 1)
    assert not torch.allclose(net[1].running_mean, before)


def test_freeze_batchnorm_optional_affine_freeze_idempotent_and_picklable():
    net = bn_net()
    freeze_batchnorm(net)
    freeze_batchnorm(net, freeze_affine=True)
    assert not net[1].weight.requires_grad and not net[1].bias.requires_grad
    assert len(net[1]._forward_pre_hooks) == 1
    for clone in (copy.deepcopy(net), pickle.loads(pickle.dumps(net))):
        clone.train()
        assert not clone[1].training
        before = clone[1].running_mean.clone()
        clone(torch.randn(4, 3, 6, 6) + 2)
        torch.testing.assert_close(clone[1].running_mean, before)


def test_warn_if_batchnorm_updates():
    net = bn_net().train()
    with pytest.warns(UserWarning, match=r"freeze_batchnorm.*GroupNorm/LayerNorm") as record:
        names = warn_if_batchnorm_updates(net)
    assert names == ["1"]
    assert "1" in str(record[0].message)

    def no_warning(model):
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            return warn_if_batchnorm_updates(model)

    assert no_warning(bn_net().eval()) == []
    assert no_warning(freeze_batchnorm(bn_net()).train()) == []
    assert no_warning(build_model("small_cnn", in_channels=1).train()) == []
    untracked = nn.Sequential(nn.BatchNorm2d(4, track_running_stats=False)).train()
    assert no_warning(untracked) == []


def test_core_import_needs_no_optional_packages():
    code = (
        "import sys, rsk_dist.models, rsk_dist.data; "
        "bad = [m for m in ('torchvision', 'ray', 'pydantic', 'faiss', 'sklearn', 'timm') if m in sys.modules]; "
        "assert not bad, bad"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


def test_missing_torchvision_gives_install_hint(monkeypatch):
    monkeypatch.setitem(sys.modules, "torchvision", None)  # makes `import torchvision` fail
    monkeypatch.setitem(sys.modules, "torchvision.models", None)
    with pytest.raises(ImportError, match="pip install torchvision"):
        build_model("resnet50")


# ---- the paper's backbones (torchvision), at image sizes small enough for a CPU ----

PAPER_BACKBONES = [("resnet50", 32), ("vit_b_16", 32), ("vit_b_32", 64)]


def paper_model(name: str, size: int, dim: int = 32) -> EmbeddingModel:
    model = build_model(name, dim=dim, dropout=0.1, image_size=size).train()
    if name.startswith("vit"):
        # dropout on everywhere a ViT has it (torchvision builds them with p = 0)
        for m in model.modules():
            if isinstance(m, nn.Dropout):
                m.p = 0.1
            elif isinstance(m, nn.MultiheadAttention):
                m.dropout = 0.1
    return model


@pytest.mark.parametrize("name,size", PAPER_BACKBONES)
def test_two_pass_gradient_of_paper_backbones_equals_one_backward(name, size):
    from rsk_dist.engine import LargeBatchStep
    from rsk_dist.losses import RecallAtKSurrogate

    torch.manual_seed(0)
    model = paper_model(name, size)
    images = torch.rand(6, 3, size, size)
    labels = torch.tensor([0, 1, 2, 0, 1, 2])
    loss_fn = RecallAtKSurrogate(k=(1, 2), tau2=0.05)
    params = [p for p in model.parameters() if p.requires_grad]

    def grads():
        out = [p.grad.clone() for p in params]
        model.zero_grad(set_to_none=True)
        return out

    # one backward through the chunked forward, graph kept
    torch.manual_seed(7)
    loss_fn(torch.cat([model(c) for c in images.split(4)]), labels).backward()
    expected = grads()
    torch.manual_seed(7)
    LargeBatchStep(model, loss_fn, chunk_size=4).step(images, labels)
    got = grads()
    for e, g in zip(expected, got):
        torch.testing.assert_close(g, e, rtol=1e-4, atol=1e-4 * max(e.abs().max().item(), 1e-8))
    # the dropout draw matters: another seed gives another gradient (so the RNG replay is tested)
    torch.manual_seed(8)
    loss_fn(torch.cat([model(c) for c in images.split(4)]), labels).backward()
    assert not torch.allclose(grads()[-2], expected[-2], rtol=1e-3)
    if name == "resnet50":
        bns = [m for m in model.modules() if isinstance(m, nn.BatchNorm2d)]
        assert bns and not any(m.training for m in bns)
        torch.testing.assert_close(bns[0].running_mean, torch.zeros_like(bns[0].running_mean))


@pytest.mark.parametrize("name,size", PAPER_BACKBONES)
def test_paper_backbones_load_pretrained_weights_from_a_local_file(name, size, tmp_path):
    import torchvision

    torch.manual_seed(1)
    # torchvision's own model at its own (224) size, as its published weights are
    reference = getattr(torchvision.models, name)(weights=None)
    torch.save(reference.state_dict(), tmp_path / "w.pth")
    model = build_model(name, dim=16, pretrained=str(tmp_path / "w.pth"), image_size=size)
    if name == "resnet50":
        torch.testing.assert_close(model.backbone[0].weight, reference.conv1.weight)
        torch.testing.assert_close(model.backbone[7][2].conv3.weight, reference.layer4[2].conv3.weight)
    else:
        vit = model.backbone.vit
        torch.testing.assert_close(vit.conv_proj.weight, reference.conv_proj.weight)
        torch.testing.assert_close(vit.encoder.layers[-1].mlp[0].weight, reference.encoder.layers[-1].mlp[0].weight)
        # the position grid is resampled to the smaller image; the class token's position is kept
        assert vit.encoder.pos_embedding.shape == (1, 1 + (size // vit.patch_size) ** 2, 768)
        torch.testing.assert_close(vit.encoder.pos_embedding[:, 0], reference.encoder.pos_embedding[:, 0])
    assert model.eval()(torch.rand(2, 3, size, size)).shape == (2, 16)
    torch.save({"conv1.weight": torch.zeros(1)}, tmp_path / "bad.pth")
    with pytest.raises((ValueError, RuntimeError)):
        build_model(name, pretrained=str(tmp_path / "bad.pth"), image_size=size)


def test_pretrained_true_without_network_names_the_fix(tmp_path, monkeypatch):
    # An empty hub cache, and every download sent to a closed local port: no network access.
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    for var in ("https_proxy", "HTTPS_PROXY", "http_proxy", "HTTP_PROXY"):
        monkeypatch.setenv(var, "http://127.0.0.1:9")
    monkeypatch.delenv("no_proxy", raising=False)
    monkeypatch.delenv("NO_PROXY", raising=False)
    # urlopen's module-wide opener reads the proxies once, when first built: let it be built
    # (from these proxies) inside the test and dropped after it, or every later urlopen of the
    # session (moto's admin calls, the Ray job server checks) would go to the closed port.
    monkeypatch.setattr(urllib.request, "_opener", None)
    with pytest.raises(RuntimeError) as info:
        build_model("resnet50", pretrained=True)
    message = str(info.value)
    assert "local state-dict file" in message and "model.pretrained" in message
    assert str(tmp_path / "torch" / "hub" / "checkpoints" / "resnet50-") in message


def test_resnet50_shapes_and_frozen_bn():
    model = build_model("resnet50", dim=64).train()
    bns = [m for m in model.modules() if isinstance(m, nn.BatchNorm2d)]
    assert bns and all(not m.training for m in bns)
    before = bns[0].running_mean.clone()
    out = model(torch.rand(2, 3, 64, 64))
    assert out.shape == (2, 64)
    torch.testing.assert_close(out.norm(dim=1), torch.ones(2))
    torch.testing.assert_close(bns[0].running_mean, before)
    assert not hasattr(model.backbone, "fc")


@pytest.mark.parametrize("name", ["vit_b_32", "vit_b_16"])
@pytest.mark.parametrize("pooling", ["cls", "avg"])
def test_vit_shapes(name, pooling):
    model = build_model(name, dim=32, pooling=pooling).eval()
    with torch.no_grad():
        out = model(torch.rand(1, 3, 224, 224))
    assert out.shape == (1, 32)
    torch.testing.assert_close(out.norm(dim=1), torch.ones(1))
    assert model.feature_dim == 768


def test_compile_option_compiles_the_backbone_in_place():
    model = build_model("small_cnn", dim=16, in_channels=1, compile=True)
    assert model.backbone._compiled_call_impl is not None and model._compiled_call_impl is None
    # in place: the state dict keeps the eager model's keys, so checkpoints load either way
    assert model.state_dict().keys() == build_model("small_cnn", dim=16, in_channels=1).state_dict().keys()


def test_channels_last_computes_the_same_function():
    torch.manual_seed(2)
    model = build_model("resnet50", dim=16).eval()
    x = torch.rand(2, 3, 32, 32)
    with torch.no_grad():
        expected = model(x)
        model.use_channels_last()
        assert model.backbone[0].weight.is_contiguous(memory_format=torch.channels_last)
        got = model(x)
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-5)
