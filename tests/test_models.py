import pytest
import torch

from pcasgd_mpi.models import MODELS, build, count_parameters, recalibrate_bn

pytestmark = pytest.mark.usefixtures("single_thread")

SHAPES = [(1, 8, 8), (1, 28, 28), (3, 32, 32)]


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("name", MODELS)
def test_forward_shape(name, shape):
    model = build(name, shape, 7).eval()
    with torch.no_grad():
        out = model(torch.randn(2, *shape))
    assert out.shape == (2, 7)


def test_mlp_accepts_flat_inputs():
    assert build("mlp", (13,), 3)(torch.randn(4, 13)).shape == (4, 3)


def test_image_models_reject_flat_inputs():
    with pytest.raises(ValueError, match="C x H x W"):
        build("cnn", (64,), 10)


def test_resnet20_parameter_count():
    n = count_parameters(build("resnet20", (3, 32, 32), 10))
    assert 260_000 <= n <= 280_000


@pytest.mark.parametrize("name", ["mlp", "cnn", "resnet20"])
def test_seeded_init(name):
    a, b, c = (build(name, (1, 8, 8), 10, seed=s) for s in (1, 1, 2))
    pa, pb, pc = (torch.cat([p.flatten() for p in m.parameters()]) for m in (a, b, c))
    assert torch.equal(pa, pb)
    assert not torch.equal(pa, pc)


def test_build_leaves_global_rng_alone():
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    build("cnn", (1, 8, 8), 10, seed=7)
    assert torch.equal(torch.rand(3), expected)


def test_unknown_model_lists_names():
    with pytest.raises(ValueError, match="resnet20"):
        build("alexnet", (1, 8, 8), 10)


def test_recalibrate_bn_changes_running_stats():
    model = build("resnet20", (1, 8, 8), 10)
    bn = model.stem[1]
    before = bn.running_mean.clone()
    x = 3 + 2 * torch.randn(33, 1, 8, 8)
    recalibrate_bn(model, x, batch_size=11)
    assert not model.training
    assert not torch.allclose(bn.running_mean, before)
    assert bn.momentum == 0.1
    # With a cumulative average the result is independent of how x is chunked.
    other = build("resnet20", (1, 8, 8), 10)
    recalibrate_bn(other, x, batch_size=33)
    assert torch.allclose(bn.running_mean, other.stem[1].running_mean, atol=1e-4)


def test_recalibrate_bn_works_on_vgg_small_input():
    model = build("vgg11", (1, 8, 8), 10)
    # 5 samples in batches of 4 leave a single-sample tail on 1x1 feature maps.
    recalibrate_bn(model, torch.randn(5, 1, 8, 8), batch_size=4)
    assert not model.training


def test_recalibrate_bn_noop_without_batchnorm():
    model = build("mlp", (1, 8, 8), 10)
    before = [p.clone() for p in model.parameters()]
    recalibrate_bn(model, torch.randn(4, 1, 8, 8))
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))
