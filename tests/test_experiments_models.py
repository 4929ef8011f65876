"""Every model: output shape and parameter count on a small batch."""

import pytest
import torch

from rollingball.experiments.models import MODELS, build_model, count_parameters

# (name, input shape, classes, parameters): counts computed by hand for the small models
# and matching the published counts for the CIFAR ResNet-18 (11.17M) and WRN-28-10 (36.5M)
CASES = [
    ("mlp", (40,), 10, 40 * 100 + 100 + 100 * 100 + 100 + 100 * 10 + 10),
    ("cnn1d", (40,), 10, (1 * 25 * 5 + 25) + 2 * (25 * 25 * 3 + 25) + 25 * 5 * 10 + 10),
    (
        "cnn2d",
        (1, 28, 28),
        10,
        (9 * 32 + 32) + (32 * 9 * 64 + 64) + (64 * 7 * 7 * 128 + 128) + 1290,
    ),
    (
        "small_cnn",
        (1, 28, 28),
        10,
        (9 * 16 + 2 * 16) + (16 * 9 * 32 + 2 * 32) + (32 * 7 * 7 * 128 + 2 * 128) + 1290,
    ),
    ("resnet6", (1, 28, 28), 10, 308_682),
    ("resnet8", (3, 32, 32), 10, 469_066),
    ("vgg9", (3, 32, 32), 10, 9_228_362),
    ("resnet18", (3, 32, 32), 10, 11_173_962),
    ("wrn16_8", (3, 32, 32), 10, 10_961_370),
    ("wrn28_10", (3, 32, 32), 100, 36_536_884),
]


def test_every_model_is_tested():
    assert {c[0] for c in CASES} == set(MODELS)


@pytest.mark.parametrize("name, shape, classes, params", CASES, ids=[c[0] for c in CASES])
def test_forward_and_parameter_count(name, shape, classes, params):
    model = build_model(name, shape, classes)
    assert count_parameters(model) == params
    model.eval()
    with torch.no_grad():
        out = model(torch.randn(2, *shape))
    assert out.shape == (2, classes)
    assert torch.isfinite(out).all()


def test_resnet6_and_resnet8_weight_layers():
    # ResNet-6: stem conv + 2 BasicBlocks x 2 convs + fc; ResNet-8: stem + 2 Bottlenecks x 3 + fc
    for name, layers in (("resnet6", 6), ("resnet8", 8)):
        model = build_model(name, (3, 32, 32), 10)
        weight_layers = [
            n
            for n, m in model.named_modules()
            if isinstance(m, (torch.nn.Conv2d, torch.nn.Linear)) and "shortcut" not in n
        ]
        assert len(weight_layers) == layers


def test_mlp_options_and_vgg9_on_mnist():
    model = build_model("mlp", (1, 8, 8), 10, hidden=[32], activation="tanh")
    assert count_parameters(model) == 64 * 32 + 32 + 32 * 10 + 10
    assert isinstance(model.net[2], torch.nn.Tanh)
    vgg = build_model("vgg9", (1, 28, 28), 10)
    convs = [m for m in vgg.modules() if isinstance(m, torch.nn.Conv2d)]
    assert len(convs) == 8 and all(c.kernel_size == (3, 3) for c in convs)
    assert sum(isinstance(m, torch.nn.BatchNorm2d) for m in vgg.modules()) == 8
    assert vgg(torch.randn(2, 1, 28, 28)).shape == (2, 10)


def test_bad_names_and_shapes():
    with pytest.raises(ValueError, match="unknown model 'resnet1000'"):
        build_model("resnet1000", (3, 32, 32), 10)
    with pytest.raises(ValueError, match="image inputs"):
        build_model("resnet18", (40,), 10)
    with pytest.raises(ValueError, match="unknown activation"):
        build_model("mlp", (40,), 10, activation="sigmoidish")


def test_mlp_he_initialisation():
    """init="he": weights normal with std √(2/fan_in), zero biases; other names refused."""
    torch.manual_seed(0)
    model = build_model("mlp", (400,), 10, hidden=[500, 500], init="he")
    linears = [m for m in model.modules() if isinstance(m, torch.nn.Linear)]
    for linear in linears:
        expected = (2.0 / linear.in_features) ** 0.5
        assert abs(linear.weight.std().item() / expected - 1) < 0.02  # ≥ 5,000 samples each
        assert abs(linear.weight.mean().item()) < 0.05 * expected
        assert not linear.bias.any()
    default = build_model("mlp", (400,), 10, hidden=[500, 500])
    first = next(m for m in default.modules() if isinstance(m, torch.nn.Linear))
    assert first.weight.std().item() < 0.5 * (2.0 / 400) ** 0.5  # PyTorch's: U(±1/√fan_in)
    with pytest.raises(ValueError, match="unknown init 'xavier'"):
        build_model("mlp", (40,), 10, init="xavier")


def test_small_cnn_has_batchnorm_pooling_and_dropout():
    torch.manual_seed(0)
    model = build_model("small_cnn", (1, 28, 28), 10)
    kinds = [type(m) for m in model.modules()]
    assert kinds.count(torch.nn.BatchNorm2d) == 2 and kinds.count(torch.nn.BatchNorm1d) == 1
    assert kinds.count(torch.nn.MaxPool2d) == 2
    assert [m.p for m in model.modules() if isinstance(m, torch.nn.Dropout)] == [0.25, 0.5]
    x = torch.randn(8, 1, 28, 28)
    assert not torch.equal(model(x), model(x))  # Dropout draws anew in training mode
    model.eval()
    assert torch.equal(model(x), model(x))
    wide = build_model("small_cnn", (1, 28, 28), 10, channels=[32, 64], hidden=64)
    assert wide(x).shape == (8, 10)
