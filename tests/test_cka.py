"""common.cka against float64 references written from the papers' formulas."""
import itertools

import numpy as np
import pytest
import torch

import common


def reference_cka(x, y):
    """Kornblith et al. 2019, eq. 1-4: HSIC(K, L) = tr(K H L H) / (n-1)^2 with linear kernels, in float64."""
    x = np.asarray(x, dtype=np.float64).reshape(len(x), -1)
    y = np.asarray(y, dtype=np.float64).reshape(len(y), -1)
    n = len(x)
    h = np.eye(n) - np.ones((n, n)) / n
    k, l = x @ x.T, y @ y.T

    def hsic(a, b):
        return np.trace(a @ h @ b @ h) / (n - 1) ** 2

    return hsic(k, l) / np.sqrt(hsic(k, k) * hsic(l, l))


def reference_unbiased_hsic(x, y):
    """The U-statistic of Song et al. 2012 (eq. 4 / the sum over 4-tuples of distinct indices), brute force."""
    x = np.asarray(x, dtype=np.float64).reshape(len(x), -1)
    y = np.asarray(y, dtype=np.float64).reshape(len(y), -1)
    n = len(x)
    k, l = x @ x.T, y @ y.T
    total, count = 0.0, 0
    for i, j, q, r in itertools.permutations(range(n), 4):
        terms = 0.0
        for t, u, v, w in itertools.permutations((i, j, q, r)):
            terms += k[t, u] * l[t, u] + k[t, u] * l[v, w] - 2 * k[t, u] * l[t, v]
        total += terms / 24
        count += 1
    return total / count


def reference_unbiased_cka(x, y):
    return reference_unbiased_hsic(x, y) / np.sqrt(reference_unbiased_hsic(x, x) * reference_unbiased_hsic(y, y))


@pytest.fixture
def pair():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(32, 3, 4, 4, generator=g)  # 48 features per example
    y = x.flatten(1)[:, :20] @ torch.randn(20, 24, generator=g) + 0.5 * torch.randn(32, 24, generator=g)
    return x, y


@pytest.mark.parametrize("n, d1, d2", [(32, 48, 24), (64, 6, 5), (8, 300, 500)])
def test_cka_matches_reference(n, d1, d2):
    g = torch.Generator().manual_seed(n)
    x = torch.randn(n, d1, generator=g)
    y = torch.tanh(x @ torch.randn(d1, d2, generator=g)) + torch.randn(n, d2, generator=g)
    assert common.cka(x, y).item() == pytest.approx(reference_cka(x, y), abs=1e-5)


def test_textbook_cka_is_kornblith_et_al():
    g = torch.Generator().manual_seed(4)
    x = torch.randn(20, 7, generator=g)
    y = torch.sin(x @ torch.randn(7, 9, generator=g)) + 0.3 * torch.randn(20, 9, generator=g)
    assert common.textbook_cka(x, y).item() == pytest.approx(reference_cka(x, y), abs=1e-12)


@pytest.mark.parametrize("n, d1, d2", [(16, 300, 200), (256, 12, 9), (64, 64, 64)])
def test_fast_cka_equals_the_textbook_form(n, d1, d2):
    # Shapes that pick the Gram form, the feature form, and the boundary between them.
    g = torch.Generator().manual_seed(d1)
    x = torch.randn(n, d1, generator=g) * 3 + 1
    y = torch.relu(x[:, :min(d1, d2)] @ torch.randn(min(d1, d2), d2, generator=g)) + torch.randn(n, d2, generator=g)
    assert common.cka(x, y).item() == pytest.approx(common.textbook_cka(x, y).item(), abs=1e-5)


def test_gram_and_feature_forms_agree(pair):
    x, y = pair[0].flatten(1), pair[1]
    x, y = x - x.mean(0), y - y.mean(0)
    for unbiased in (False, True):
        gram = common._hsic_gram(x @ x.T, y @ y.T, unbiased)  # centred rows: centred Gram matrices
        feat = common._hsic_features(x, y, unbiased)
        for a, b in zip(gram, feat):
            assert a.item() == pytest.approx(b.item(), rel=1e-4)


def test_unbiased_matches_u_statistic():
    g = torch.Generator().manual_seed(1)
    x = torch.randn(7, 5, generator=g)
    y = x @ torch.randn(5, 3, generator=g) + torch.randn(7, 3, generator=g)
    expected = reference_unbiased_cka(x, y)
    assert common.cka(x, y, unbiased=True).item() == pytest.approx(expected, abs=1e-4)
    # 7 x 5 picks the feature form; 7 x 300 picks the Gram form. Both must agree with the U-statistic.
    wide = torch.cat([x, torch.zeros(7, 295)], dim=1)
    assert common.cka(wide, y, unbiased=True).item() == pytest.approx(expected, abs=1e-4)
    assert abs(expected - reference_cka(x, y)) > 1e-3  # the debiased value really differs


def test_unbiased_needs_four_examples():
    with pytest.raises(ValueError, match="at least 4"):
        common.cka(torch.randn(3, 5), torch.randn(3, 5), unbiased=True)


def test_mismatched_batch_is_an_error():
    with pytest.raises(ValueError, match="examples"):
        common.cka(torch.randn(4, 5), torch.randn(5, 5))


def test_properties(pair):
    x, y = pair
    assert common.cka(x, x).item() == pytest.approx(1.0, abs=1e-6)
    assert common.cka(x, y).item() == pytest.approx(common.cka(y, x).item(), abs=1e-6)
    q, _ = torch.linalg.qr(torch.randn(24, 24, generator=torch.Generator().manual_seed(2)))
    base = common.cka(x, y).item()
    assert common.cka(x, 3.7 * y @ q + 5.0).item() == pytest.approx(base, abs=1e-5)
    # An arbitrary invertible (but not orthogonal) map changes linear CKA.
    a = torch.randn(24, 24, generator=torch.Generator().manual_seed(3)) + 0.1 * torch.eye(24)
    assert abs(common.cka(x, y @ a).item() - base) > 1e-2


def test_constant_and_zero_inputs_are_finite():
    y = torch.randn(16, 8)
    for x in (torch.zeros(16, 8), torch.full((16, 8), 0.1), torch.ones(16, 4000) * 3):
        for unbiased in (False, True):
            x_ = x.clone().requires_grad_(True)
            y_ = y.clone().requires_grad_(True)
            value = common.cka(x_, y_, unbiased)
            assert value.item() == 0.0
            value.backward()
            assert torch.isfinite(x_.grad).all() and torch.isfinite(y_.grad).all()


def test_float32_under_autocast(pair):
    x, y = pair
    with torch.autocast("cpu", dtype=torch.bfloat16):
        value = common.cka(x.to(torch.bfloat16), y)
    assert value.dtype == torch.float32
    # bf16 inputs carry about 3 significant digits; the computation itself must not lose more.
    assert value.item() == pytest.approx(reference_cka(x.to(torch.bfloat16).float(), y), abs=1e-5)


def test_gradient_matches_finite_differences(pair):
    x, y = pair
    x = x.clone().requires_grad_(True)
    common.cka(x, y).backward()
    eps = 1e-4
    for i in [(0, 1, 2, 3), (5, 0, 0, 0), (31, 2, 3, 1)]:
        xp, xm = x.detach().double().clone(), x.detach().double().clone()
        xp[i] += eps
        xm[i] -= eps
        numeric = (reference_cka(xp, y) - reference_cka(xm, y)) / (2 * eps)
        assert x.grad[i].item() == pytest.approx(numeric, rel=1e-2, abs=1e-6)


def test_unbiased_cka_of_ordinary_offset_features_is_not_the_degenerate_floor():
    """Features offset by 4 standard deviations, n = 4096, 256 of them: the debiased CKA must be the textbook's
    (0.33), with a gradient; a floor not divided by n(n - 3) like the HSIC it is compared with returns exactly 0
    here (HSIC(K, K) 256 against a floor of 317)."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(4096, 256, generator=g) + 4
    y = x @ torch.randn(256, 32, generator=g) + torch.randn(4096, 32, generator=g)
    x.requires_grad_(True)
    value = common.cka(x, y, unbiased=True)
    value.backward()
    assert value.item() == pytest.approx(common.textbook_cka(x.detach(), y, unbiased=True).item(), abs=1e-5)
    assert value.item() > 0.1 and x.grad.norm() > 0


def test_textbook_unbiased_cka_is_the_u_statistic():
    g = torch.Generator().manual_seed(5)
    x = torch.randn(8, 4, generator=g)
    y = x @ torch.randn(4, 3, generator=g) + torch.randn(8, 3, generator=g)
    assert common.textbook_cka(x, y, unbiased=True).item() == pytest.approx(reference_unbiased_cka(x, y), abs=1e-12)


@pytest.mark.parametrize("offset", [100.0, 300.0])
def test_features_far_from_zero_keep_their_digits(offset):
    """n = 64 examples of 2000 features offset 100 or 300 times their spread (the Gram form): within 1e-5 of the
    textbook (building the uncentred Gram matrix in float32 first lost 2e-4 at 100x, 9e-3 at 300x)."""
    g = torch.Generator().manual_seed(1)
    x = torch.randn(64, 2000, generator=g) + offset
    y = 0.5 * torch.randn(64, 2000, generator=g) + x
    assert common.cka(x, y).item() == pytest.approx(common.textbook_cka(x, y).item(), abs=1e-5)
