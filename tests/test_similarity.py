"""RSA and D-MNN, the similarities beside CKA: each fast form against its textbook form, and those against direct
float64 computations of the definitions written here; their invariances; D-MNN's limit at zero temperature; D-MNN
on two processes against one."""
import copy
import math
import os
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F

import common
from runs import spawn_two


def pair(n, d1, d2, seed=0, noise=0.5):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d1, generator=g)
    y = torch.tanh(x @ torch.randn(d1, d2, generator=g) / math.sqrt(d1)) + noise * torch.randn(n, d2, generator=g)
    return x, y


def direct_rsa(x, y):
    """Pearson's r of the cosine similarities of every pair i < j, from the formulas, in numpy float64."""
    def cosines(t):
        t = np.asarray(t, dtype=np.float64).reshape(len(t), -1)
        return [t[i] @ t[j] / np.sqrt((t[i] @ t[i]) * (t[j] @ t[j])) for i in range(len(t)) for j in range(i + 1,
                                                                                                             len(t))]

    return np.corrcoef(cosines(x), cosines(y))[0, 1]


def direct_mutual_knn(x, y, k):
    """Huh et al.'s score from its definition: per example, its k most similar others (inner product of unit rows)
    in each representation; the mean fraction shared."""
    def knn(t):
        t = np.asarray(t, dtype=np.float64).reshape(len(t), -1)
        t = t / np.linalg.norm(t, axis=1, keepdims=True)
        s = t @ t.T
        np.fill_diagonal(s, -np.inf)
        return [set(np.argsort(-row, kind="stable")[:k]) for row in s]

    return np.mean([len(a & b) / k for a, b in zip(knn(x), knn(y))])


@pytest.mark.parametrize("n, d1, d2", [(24, 300, 200), (200, 6, 5), (40, 30, 50)])
def test_rsa_is_its_textbook_form_and_the_definition(n, d1, d2):
    # Shapes that pick the n x n form, the d x d form, and near the boundary between them.
    x, y = pair(n, d1, d2, seed=n)
    x = x + 2.0  # offset rows: cosines near one another, which float32 sums would cancel
    textbook = common.textbook_rsa(x, y).item()
    assert textbook == pytest.approx(direct_rsa(x, y), abs=1e-12)
    assert common.rsa(x, y).item() == pytest.approx(textbook, abs=1e-6)


def test_the_hard_mutual_knn_score_is_the_definition():
    for n, k, seed in ((30, 5, 0), (64, 10, 1), (12, 1, 2)):
        x, y = pair(n, 16, 8, seed=seed, noise=1.0)
        expected = direct_mutual_knn(x, y, k)
        assert common.textbook_mutual_knn(x, y, k) == pytest.approx(expected, abs=1e-12)
        assert common.mutual_knn(x, y, k).item() == pytest.approx(expected, abs=1e-6)
        assert 0 < expected < 1  # neither trivial


@pytest.mark.parametrize("k, temperature", [(5, 0.1), (10, 0.5), (3, 1.0)])
def test_dmnn_is_its_textbook_form(k, temperature):
    x, y = pair(48, 20, 12, seed=k, noise=0.8)
    assert common.dmnn(x, y, k, temperature).item() == pytest.approx(common.textbook_dmnn(
        x, y, k, temperature).item(), abs=1e-6)


FAST = {"cka": common.cka, "cka unbiased": lambda x, y: common.cka(x, y, unbiased=True), "rsa": common.rsa,
        "dmnn": lambda x, y: common.dmnn(x, y, 10, 0.1)}
TEXTBOOK = {"cka": common.textbook_cka, "cka unbiased": lambda x, y: common.textbook_cka(x, y, unbiased=True),
            "rsa": common.textbook_rsa, "dmnn": lambda x, y: common.textbook_dmnn(x, y, 10, 0.1)}


@pytest.mark.parametrize("name", list(FAST))
def test_every_textbook_form_has_the_gradient_of_its_value(name):
    """torch.autograd.gradcheck: each float64 textbook form's autograd gradient is its finite differences."""
    x, y = pair(16, 6, 5, seed=7)
    assert torch.autograd.gradcheck(lambda t: TEXTBOOK[name](t, y.double()), x.double().requires_grad_(True))


@pytest.mark.parametrize("name", list(FAST))
@pytest.mark.parametrize("n, d1, d2", [(64, 4096, 2048), (256, 128, 128)])
def test_every_similarity_trains_on_the_gradient_of_its_textbook_form(name, n, d1, d2):
    """Alignment follows the fast form's autograd gradient: it must be the float64 textbook form's, at the runs'
    sizes (an image batch's flattened maps, the Gram form; a batch of tokens, the feature form), rows offset as
    activations after a ReLU are. D-MNN's held its threshold and spread constant: cosine 0.85 with the score's."""
    x, y = pair(n, d1, d2, seed=n)
    x, y = x + 1.0, y + 0.5
    fast = x.clone().requires_grad_(True)
    FAST[name](fast, y).backward()
    textbook = x.double().requires_grad_(True)
    TEXTBOOK[name](textbook, y.double()).backward()
    expected = textbook.grad
    torch.testing.assert_close(fast.grad.double(), expected, rtol=0, atol=1e-3 * expected.abs().max().item())
    assert F.cosine_similarity(fast.grad.double().flatten(), expected.flatten(), dim=0) > 1 - 1e-5


def effective_rank(t):
    """exp of the entropy of the centred outputs' normalized singular values: 1 for outputs on one line."""
    p = torch.linalg.svdvals((t - t.mean(0)).double())
    p = p / p.sum()
    return torch.exp(-(p * p.clamp_min(1e-30).log()).sum()).item()


def aligned_outputs(name, seed, steps=300):
    """A new module (Linear, tanh, Linear) aligned to a guide's tanh(x A) under a similarity by Adam, as alignment
    does; its outputs on held-out inputs."""
    g = torch.Generator().manual_seed(seed)
    a = torch.randn(32, 64, generator=g) / math.sqrt(32)
    torch.manual_seed(seed)
    new = nn.Sequential(nn.Linear(32, 64), nn.Tanh(), nn.Linear(64, 64))
    opt = torch.optim.Adam(new.parameters(), lr=3e-3)
    for _ in range(steps):
        x = torch.randn(256, 32, generator=g)
        (1 - FAST[name](new(x), torch.tanh(x @ a))).backward()
        opt.step()
        opt.zero_grad()
    with torch.no_grad():
        x = torch.randn(256, 32, generator=g)
        return new(x), torch.tanh(x @ a)


# The aligned outputs' effective rank over seeds 0-4 at 1 and 2 threads (the guide's 45.4): cka 33.1-33.6, unbiased
# 32.9-33.4, rsa 32.6-33.0, dmnn 32.5-33.0; each bound 12 below its worst. This toy is milder than the one that
# showed the collapse (600 steps, held-out 10-NN): D-MNN with its threshold detached also keeps rank 33 here, so the
# gradient tests above, not this one, are what fails on that gradient.
NO_COLLAPSE = {"cka": 20, "cka unbiased": 20, "rsa": 20, "dmnn": 20}


@pytest.mark.parametrize("name", list(FAST))
def test_no_similarity_collapses_the_outputs_it_aligns(name):
    """D-MNN with its threshold held constant drove the outputs onto one direction (issue 29: effective rank 39 -> 1,
    every cosine 1.00); each similarity must keep the outputs spread as the guide's are."""
    ours, guide = aligned_outputs(name, seed=0)
    assert effective_rank(ours) > NO_COLLAPSE[name], (effective_rank(ours), effective_rank(guide))


def test_soft_dmnn_tends_to_the_hard_score_as_the_temperature_goes_to_zero():
    # Well separated: 8 tight clusters of 6, the neighbours of each example its 5 cluster mates, in x; y keeps the
    # clusters but merges pairs of them, so the hard score is 5/5 in neither limit trivially: about a half.
    g = torch.Generator().manual_seed(0)
    centres = torch.randn(8, 32, generator=g) * 10
    x = centres.repeat_interleave(6, 0) + 0.01 * torch.randn(48, 32, generator=g)
    y = x.clone()
    y[:, :16] = centres[torch.arange(8) // 2 * 2].repeat_interleave(6, 0)[:, :16]
    hard = common.textbook_mutual_knn(x, y, 5)
    errors = [abs(common.dmnn(x, y, 5, t).item() - hard) for t in (1.0, 0.3, 0.1, 0.01, 0.001)]
    assert all(b <= a + 1e-6 for a, b in zip(errors, errors[1:])) and errors[0] > 1e-2 and errors[-1] < 1e-6, errors
    assert common.dmnn(x, x, 5, 0.1).item() == pytest.approx(1.0, abs=1e-6)  # identical neighbourhoods


def test_every_similarity_is_blind_to_rotation_and_scale():
    x, y = pair(40, 24, 24, seed=3)
    q = torch.linalg.qr(torch.randn(24, 24, generator=torch.Generator().manual_seed(4)))[0]
    moved = 3.7 * y @ q
    a = torch.randn(24, 24, generator=torch.Generator().manual_seed(5)) + 0.1 * torch.eye(24)
    for name, f in (("cka", common.cka), ("rsa", common.rsa), ("dmnn", lambda x, y: common.dmnn(x, y, 5, 0.1))):
        base = f(x, y).item()
        assert f(x, moved).item() == pytest.approx(base, abs=1e-5), name
        assert f(0.01 * x @ q.T, y).item() == pytest.approx(base, abs=1e-5), name
        assert abs(f(x, y @ a).item() - base) > 1e-3, name  # an arbitrary linear map is not free


def test_dmnn_sends_gradients_to_the_hybrid_only_and_stays_in_range():
    x, y = pair(30, 10, 10, seed=6)
    x.requires_grad_(True)
    value = common.dmnn(x, y, 4, 0.2)
    value.backward()
    assert 0 <= value.item() <= 1 and x.grad.abs().sum() > 0 and y.grad is None


def test_a_bad_similarity_is_refused_before_any_work():
    with pytest.raises(SystemExit, match="--similarity=cosine: expected one of cka, dmnn, rsa"):
        common.configure({}, ["--similarity=cosine"])
    with pytest.raises(SystemExit, match="--mnn_k must be positive"):
        common.configure({}, ["--mnn_k=0"])


STAGE = common.Stage(swap=None, compare=[("1", "1"), ("4", "4")], train=["1", "4"])


def aligned(rank, world, out):
    """Three D-MNN alignment steps on this rank's rows of fixed global batches; rank 0 saves values and weights."""
    torch.manual_seed(0)
    guide = nn.Sequential(nn.Linear(6, 16), nn.Tanh(), nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 12)).eval()
    guide.requires_grad_(False)
    hybrid = copy.deepcopy(guide)
    hybrid[1], hybrid[4] = nn.Sequential(nn.Linear(16, 5), nn.GELU(), nn.Linear(5, 16)), nn.Linear(16, 12)
    params = list(hybrid[1].parameters()) + list(hybrid[4].parameters())
    opt = torch.optim.SGD(params, lr=0.5, momentum=0.9)
    cfg = SimpleNamespace(dtype="float32", similarity="dmnn", similarity_scope="global", mnn_k=4,
                          mnn_temperature=0.2, grad_clip=1.0)
    g = torch.Generator().manual_seed(1)
    history = []
    for x in [torch.randn(16, 6, generator=g) for _ in range(3)]:
        measured = common.align_step(guide, hybrid, STAGE, x[rank * 16 // world:(rank + 1) * 16 // world], opt, cfg)
        history.append([v.item() for m in ("dmnn", "mutual_knn") for v in measured[m].values()])
    if rank == 0:
        torch.save({"values": history, "weights": [p.detach().clone() for p in params]}, out)


def two_processes(rank, init_method, out):
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=init_method, rank=rank, world_size=2)
    try:
        aligned(rank, 2, out)
        dist.barrier()
    finally:
        dist.destroy_process_group()


def test_dmnn_on_two_processes_is_dmnn_of_the_global_batch(tmp_path):
    aligned(0, 1, str(tmp_path / "one.pt"))
    spawn_two(two_processes, (str(tmp_path / "two.pt"),), str(tmp_path))
    one, two = torch.load(tmp_path / "one.pt"), torch.load(tmp_path / "two.pt")
    assert np.allclose(one["values"], two["values"], atol=1e-5)
    for a, b in zip(one["weights"], two["weights"]):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)
    assert os.path.getsize(tmp_path / "two.pt") > 0 and one["values"][0] != one["values"][-1]  # it moved
