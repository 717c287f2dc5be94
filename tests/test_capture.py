"""Activation capture with early stop, and module replacement by dotted name."""
import pytest
import torch
import torch.nn as nn
import torchvision

import common
import resnet18_to_mlp


class Counting(nn.Module):
    """Wraps a module and counts how often it runs."""

    def __init__(self, inner):
        super().__init__()
        self.inner, self.calls = inner, 0

    def forward(self, x):
        self.calls += 1
        return self.inner(x)


def small_net():
    torch.manual_seed(0)
    return nn.Sequential(Counting(nn.Linear(4, 8)), nn.ReLU(), Counting(nn.Linear(8, 8)), nn.Tanh(),
                         Counting(nn.Linear(8, 3)))


def test_forward_until_returns_outputs_and_stops_early():
    net = small_net()
    x = torch.randn(5, 4)
    h0 = net[0].inner(x)
    h2 = net[2].inner(torch.relu(h0))
    out = common.forward_until(net, x, ["2", "0"])
    assert torch.equal(out[0], h2) and torch.equal(out[1], h0)
    assert (net[0].calls, net[2].calls, net[4].calls) == (1, 1, 0)  # the last layer never ran


def test_forward_until_names_missing_modules():
    with pytest.raises(KeyError, match="nope"):
        common.forward_until(small_net(), torch.randn(2, 4), ["0", "nope"])


def test_replace_checks_shapes_and_returns_old():
    net = small_net()
    shapes = common.io_shapes(net, torch.randn(2, 4), ["2"])
    assert shapes["2"] == ((8,), (8,))
    with pytest.raises(ValueError, match=r"'2'.*\(5,\).*\(8,\)"):
        common.replace(net, "2", nn.Linear(8, 5), *shapes["2"])
    new = nn.Linear(8, 8)
    old = common.replace(net, "2", new, *shapes["2"])
    assert isinstance(old, Counting) and net[2] is new


def test_dotted_names_reach_nested_modules():
    model = torchvision.models.resnet18(num_classes=10)
    new = nn.Identity()
    common.set_module(model, "layer2.0.downsample.0", new)
    assert model.layer2[0].downsample[0] is new
    assert common.get_module(model, "layer1.1.conv2") is model.layer1[1].conv2


@pytest.mark.parametrize("image_size", [32, 64])
def test_every_resnet18_convolution_can_be_replaced(image_size):
    torch.manual_seed(0)
    guide = torchvision.models.resnet18(num_classes=10).eval()
    names = resnet18_to_mlp.conv_names(guide)
    assert len(names) == 20 and sum("downsample" in n for n in names) == 3
    x = torch.randn(2, 3, image_size, image_size)
    shapes = common.io_shapes(guide, x, names)
    for name in names:
        conv = common.get_module(guide, name)
        in_shape, out_shape = shapes[name]
        # Independent check of the probed shapes from the convolution arithmetic.
        h = in_shape[1]
        expected_h = (h + 2 * conv.padding[0] - conv.kernel_size[0]) // conv.stride[0] + 1
        assert out_shape == (conv.out_channels, expected_h, expected_h) and in_shape[0] == conv.in_channels
    hybrid = resnet18_to_mlp.build_target(10, image_size, rank=8).eval()
    assert not any(isinstance(m, nn.Conv2d) for m in hybrid.modules())
    hybrid_shapes = common.io_shapes(hybrid, x, names)
    assert hybrid_shapes == shapes
    assert hybrid(x).shape == (2, 10)
