import pytest
import torch

from pcasgd_mpi.models import MODELS, build, count_parameters, recalibrate_bn, warm_up

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


# ---------------------------------------------------------------- 1-D signals (MNIST-1D)

SIGNAL = (1, 40)


@pytest.mark.parametrize("name", ["mlp", "cnn"])
def test_signal_models_forward(name):
    model = build(name, SIGNAL, 10).eval()
    with torch.no_grad():
        out = model(torch.randn(5, *SIGNAL))
    assert out.shape == (5, 10)


def test_signal_cnn_is_the_published_conv1d_net():
    model = build("cnn", SIGNAL, 10)
    convs = [m for m in model.modules() if isinstance(m, torch.nn.Conv1d)]
    assert [(c.in_channels, c.out_channels, c.kernel_size[0], c.stride[0]) for c in convs] == [
        (1, 25, 5, 2),
        (25, 25, 3, 2),
        (25, 25, 3, 2),
    ]
    # 40 -> 19 -> 10 -> 5 samples of 25 channels into the classifier.
    assert model.classifier.in_features == 125
    assert count_parameters(model) == 150 + 1900 + 1900 + 1260


def test_signal_mlp_has_100_100_hidden_units_and_images_keep_64():
    assert count_parameters(build("mlp", SIGNAL, 10)) == 40 * 100 + 100 + 100 * 100 + 100 + 100 * 10 + 10
    assert count_parameters(build("mlp", (1, 8, 8), 10)) == 64 * 64 + 64 + 64 * 64 + 64 + 64 * 10 + 10


def test_signal_cnn_adapts_to_the_length():
    assert build("cnn", (2, 100), 3)(torch.randn(2, 2, 100)).shape == (2, 3)
    with pytest.raises(ValueError, match="at least 3 samples"):
        build("cnn", (1, 1), 10)


@pytest.mark.parametrize("name", ["resnet20", "vgg11"])
def test_image_only_models_reject_signals(name):
    with pytest.raises(ValueError, match="C x H x W"):
        build(name, SIGNAL, 10)


@pytest.fixture(scope="module")
def mnist1d(tmp_path_factory):
    from pcasgd_mpi import data

    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("XDG_CACHE_HOME", str(tmp_path_factory.mktemp("cache")))
        return data.load("mnist1d")


@pytest.mark.parametrize("name", ["mlp", "cnn"])
def test_signal_models_learn_mnist1d_in_a_few_steps(name, mnist1d):
    ds = mnist1d
    model = build(name, ds.input_shape, ds.num_classes, seed=0)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    x, y = ds.x_train[:256], ds.y_train[:256]
    losses = []
    for _ in range(30):
        opt.zero_grad()
        loss = torch.nn.functional.cross_entropy(model(x), y)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert all(map(torch.isfinite, map(torch.tensor, losses)))
    assert losses[-1] < 0.8 * losses[0]


def test_warm_up_leaves_weights_running_statistics_and_gradients_as_they_were():
    model = build("resnet20", (1, 8, 8), 10).train()
    state = {k: v.clone() for k, v in model.state_dict().items()}
    x = 3 + 2 * torch.randn(6, 1, 8, 8)
    y = torch.randint(0, 10, (6,))
    warm_up(model, x, y)
    after = model.state_dict()
    assert all(torch.equal(state[k], after[k]) for k in state), "weights and BatchNorm buffers unchanged"
    assert all(p.grad is None for p in model.parameters())
    assert model.training
    # without the restore the forward in train mode would have moved the running statistics
    model(x)
    assert not torch.equal(model.stem[1].running_mean, state["stem.1.running_mean"])
