"""The generated image task: each class pattern, rolled by up to `shift` pixels, under noise."""
import pytest
import torch

import common

R = 16  # offsets searched in each direction


@pytest.fixture(scope="module")
def bank():
    # The class patterns, estimated independently as class means of an unshifted set (noise / sqrt(200) left),
    # rolled by every offset of [-R, R]^2: [offsets, classes, 3, 32, 32].
    train, _ = common.synthetic_images(2000, 10, 10, 32, shift=0, seed=0)
    images, labels = train.tensors
    means = torch.stack([images[labels == c].mean(0) for c in range(10)])
    offsets = [(dy, dx) for dy in range(-R, R + 1) for dx in range(-R, R + 1)]
    return torch.tensor(offsets), torch.stack([means.roll(o, dims=(2, 3)) for o in offsets])


def located(bank, shift):
    """(class, offset) of the best-matching rolled pattern for each validation image, and the labels."""
    offsets, patterns = bank
    _, val = common.synthetic_images(10, 300, 10, 32, shift=shift, seed=0)
    images, labels = val.tensors
    best = (images.flatten(1) @ patterns.flatten(2).flatten(0, 1).T).argmax(1)
    return best % 10, offsets[best // 10].abs().max(1).values, labels


def test_without_shift_patterns_stay_in_place(bank):
    cls, distance, labels = located(bank, 0)
    assert (cls == labels).float().mean() >= 0.95
    # A smooth pattern under noise may match one pixel off, never further.
    assert (distance == 0).float().mean() >= 0.95 and distance.max() <= 1


def test_shift_moves_patterns_by_up_to_shift_pixels(bank):
    cls, distance, labels = located(bank, 5)
    assert (cls == labels).float().mean() >= 0.95
    assert (distance <= 5).float().mean() >= 0.95 and distance.max() <= 6
    # Uniform offsets in [-5, 5]^2 put max(|dy|, |dx|) >= 4 in 1 - (7/11)^2 = 60% of images.
    assert (distance >= 4).float().mean() >= 0.4
