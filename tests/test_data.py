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


def test_the_generator_is_the_same_for_a_seed_and_its_difficulty_settings_change_it():
    settings = dict(shift=8, modes=3, colour=0.3, distractors=5, noise=2.0)
    first, second = (common.synthetic_images(64, 32, 10, 32, seed=0, **settings) for _ in range(2))
    for a, b in zip(first, second):
        assert all(torch.equal(x, y) for x, y in zip(a.tensors, b.tensors))
    assert not torch.equal(common.synthetic_images(64, 32, 10, 32, seed=1, **settings)[0].tensors[0],
                           first[0].tensors[0])
    for name, value in (("modes", 1), ("colour", 0.0), ("distractors", 0), ("noise", 1.5)):
        changed = common.synthetic_images(64, 32, 10, 32, seed=0, **{**settings, name: value})[0].tensors[0]
        assert not torch.equal(changed, first[0].tensors[0]), name


def test_each_class_has_its_modes():
    """With modes=3 and no noise, a class's images are exactly 3 distinct patterns, no two classes sharing one."""
    train, _ = common.synthetic_images(600, 10, 4, 16, modes=3, noise=0.0)
    images, labels = train.tensors
    looks = {c: {tuple(img.flatten()[:8].tolist()) for img in images[labels == c]} for c in range(4)}
    assert all(len(v) == 3 for v in looks.values())
    assert len(set().union(*looks.values())) == 12
