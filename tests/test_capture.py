"""Activation capture with early stop, and module replacement by dotted name."""
from types import SimpleNamespace

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


def test_replace_gives_make_new_the_old_module_and_its_shapes():
    net, seen = small_net(), []

    def make_new(old, in_shape, out_shape):
        seen.append((old, in_shape, out_shape))
        return nn.Linear(in_shape[0], out_shape[0])

    old = net[2]
    assert common.replace(net, "2", make_new, torch.randn(1, 4)) is old
    assert seen == [(old, (8,), (8,))] and type(net[2]) is nn.Linear
    assert net[4].calls == 0  # the shapes came from a forward pass that stopped at the replaced module
    with pytest.raises(ValueError, match=r"'4'.*\(8,\) to \(5,\).*returns \(3,\)"):
        common.replace(net, "4", lambda old, i, o: nn.Linear(8, 5), torch.randn(1, 4))


def test_replace_reaches_nested_modules_and_leaves_batchnorm_alone():
    model = torchvision.models.resnet18(num_classes=10).train()
    before = {k: v.clone() for k, v in model.state_dict().items() if "running" in k}
    common.replace(model, "layer2.0.downsample.0", lambda old, i, o: nn.Identity() if i == o else
                   nn.Conv2d(old.in_channels, old.out_channels, 1, stride=2), torch.randn(1, 3, 32, 32))
    assert type(model.layer2[0].downsample[0]) is nn.Conv2d and model.training
    # The probe ran in eval mode: no running statistics moved.
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())


@pytest.mark.parametrize("image_size", [32, 64])
def test_every_resnet18_convolution_can_be_replaced(image_size):
    torch.manual_seed(0)
    guide = torchvision.models.resnet18(num_classes=10).eval()
    x = torch.randn(2, 3, image_size, image_size)
    stages = resnet18_to_mlp.make_stages(guide, x[:1], SimpleNamespace(rank=8, order="forward"))
    names = [n for n, m in guide.named_modules() if isinstance(m, nn.Conv2d)]
    assert [s.train for s in stages] == [[n] for n in names] and len(names) == 20
    target = common.swapped(guide, stages).eval()
    assert not any(isinstance(m, nn.Conv2d) for m in target.modules())
    # Each low-rank map maps the convolution's input shape to its output shape, by the convolution arithmetic.
    for name in names:
        conv, mlp = guide.get_submodule(name), target.get_submodule(name)
        (out,) = common.forward_until(target, x, [name])
        h_in = round((mlp.down.in_features / conv.in_channels) ** 0.5)
        expected = (h_in + 2 * conv.padding[0] - conv.kernel_size[0]) // conv.stride[0] + 1
        assert out.shape == (2, conv.out_channels, expected, expected) == (2, *mlp.out_shape)
        assert out.shape == common.forward_until(guide, x, [name])[0].shape
    assert target(x).shape == (2, 10)
