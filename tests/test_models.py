"""Every registered backbone and the PCL network: shapes, backward, finite values, split structure."""

import pytest
import torch

from pcltool.models import PCLNetwork, available_backbones, backbone_spec, create_backbone, extract_branch


def _input(name, n=2):
    size = 16 if backbone_spec(name).input_kind == "cifar" else 32
    return torch.randn(n, 3, size, size)


@pytest.mark.parametrize("name", available_backbones())
def test_backbone_forward_backward(name):
    torch.manual_seed(0)
    net = create_backbone(name, num_classes=7)
    x = _input(name)
    logits = net(x)
    assert logits.shape == (2, 7)
    assert torch.isfinite(logits).all()
    logits.sum().backward()
    grads = [p.grad for p in net.parameters()]
    assert all(g is not None and torch.isfinite(g).all() for g in grads)
    # split structure: classifier(branch(trunk(x)))
    assert net.forward_features(x).shape == (2, net.feature_dim)


@pytest.mark.parametrize("name, params, feature", [
    ("resnet32", 464_154, 64), ("resnet110", 1_727_962, 64), ("resnet20", 269_722, 64),
    ("densenet40_12", 176_122, 132), ("vgg16", 14_724_042, 512),
])
def test_published_sizes(name, params, feature):
    net = create_backbone(name, 10)
    assert sum(p.numel() for p in net.parameters()) == params
    assert net.feature_dim == feature


def test_grey_input_channels():
    net = create_backbone("resnet20", 10, in_channels=1)
    assert net(torch.randn(3, 1, 8, 8)).shape == (3, 10)


@pytest.mark.parametrize("name", ["resnet20", "densenet40_12", "wrn20_8", "vgg16"])
def test_pcl_network_shapes_and_backward(name):
    torch.manual_seed(0)
    net = PCLNetwork(name, num_classes=5, num_peers=3)
    size = 16
    views = torch.randn(3, 4, 3, size, size)
    peers, ens = net(views)
    assert peers.shape == (3, 4, 5) and ens.shape == (4, 5)
    (peers.sum() + ens.sum()).backward()
    assert all(p.grad is not None for p in net.parameters())
    # evaluation: one image batch that every peer sees
    net.eval()
    peers, ens = net(torch.randn(4, 3, size, size))
    assert peers.shape == (3, 4, 5)


def test_peers_are_independently_initialised():
    torch.manual_seed(0)
    net = PCLNetwork("resnet20", 10, 3)
    w = [p.classifier.weight for p in net.peers]
    assert not torch.equal(w[0], w[1]) and not torch.equal(w[1], w[2])


def test_each_peer_uses_its_own_view():
    torch.manual_seed(0)
    net = PCLNetwork("resnet20", 10, 3).eval()
    views = torch.randn(3, 2, 3, 32, 32)
    peers, _ = net(views)
    changed = views.clone()
    changed[1] += 1.0  # only view 2 changes
    peers2, _ = net(changed)
    assert torch.equal(peers[0], peers2[0]) and torch.equal(peers[2], peers2[2])
    assert not torch.allclose(peers[1], peers2[1])


def test_batched_and_per_view_trunk_agree_in_eval():
    torch.manual_seed(0)
    net = PCLNetwork("resnet20", 10, 3).eval()
    views = torch.randn(3, 2, 3, 32, 32)
    a, ea = net(views)
    net.batched_views = False
    b, eb = net(views)
    torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(ea, eb, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("name", [n for n in available_backbones() if backbone_spec(n).input_kind == "cifar"])
def test_extract_branch_equals_peer(name):
    torch.manual_seed(0)
    net = PCLNetwork(name, 6, 2).eval()
    x = torch.randn(2, 3, 16, 16)
    plain = extract_branch(net, 1).eval()
    torch.testing.assert_close(plain(x), net(x)[0][1], rtol=0, atol=1e-5)
    assert sum(p.numel() for p in plain.parameters()) == sum(p.numel() for p in create_backbone(name, 6).parameters())
