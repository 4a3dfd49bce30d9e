"""The networks have the architectures the issues cite."""

import pytest
import torch
from torch import nn

from mnist_precision.task.nets import convnet, mlp, paper_cnn


@pytest.mark.parametrize("build", [mlp, paper_cnn, convnet])
def test_each_network_maps_images_to_ten_logits(build):
    assert build()(torch.rand(3, 1, 28, 28)).shape == (3, 10)


def test_mlp_is_the_flux_tutorial_network():
    linears = [m for m in mlp() if isinstance(m, nn.Linear)]
    assert [(m.in_features, m.out_features) for m in linears] == [(784, 128), (128, 10)]
    assert any(isinstance(m, nn.ReLU) for m in mlp())


def test_paper_cnn_matches_the_julia_ad_paper():
    net = paper_cnn()
    conv = next(m for m in net if isinstance(m, nn.Conv2d))
    dense = [m for m in net if isinstance(m, nn.Linear)]
    assert conv.weight.shape == (6, 1, 3, 3) and conv.bias is None
    assert any(isinstance(m, nn.MaxPool2d) and m.kernel_size == 2 for m in net)
    assert (dense[0].in_features, dense[0].out_features, dense[0].bias) == (6 * 13 * 13, 84, None)
    assert (dense[1].in_features, dense[1].out_features) == (84, 10)


def test_wide_mlp_stacks_the_hidden_layers():
    net = mlp(hidden=32, layers=3)
    assert [(m.in_features, m.out_features) for m in net if isinstance(m, nn.Linear)] == [(784, 32), (32, 32), (32, 32), (32, 10)]
