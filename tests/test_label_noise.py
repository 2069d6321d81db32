"""Label noise: exact counts worked out by hand, the classes each kind may flip, seeds, refusals,
and the class order of the real CIFAR-10 mirror the asymmetric map relies on."""

from __future__ import annotations

import pytest
import torch

from normbench.data import ArrayDataset, load_dataset
from normbench.errors import NormbenchError
from normbench.label_noise import (
    CIFAR10_CLASSES,
    flipped,
    noisy_labels,
    noisy_training_set,
)

AIRPLANE, AUTOMOBILE, BIRD, CAT, DEER, DOG, FROG, HORSE, SHIP, TRUCK = range(10)


def balanced(per_class: int, classes: int = 10) -> torch.Tensor:
    return torch.arange(classes).repeat_interleave(per_class)


def transitions(labels: torch.Tensor, noisy: torch.Tensor) -> dict[tuple[int, int], int]:
    """(old class, new class) -> how many labels changed that way."""
    changed = labels != noisy
    pairs = zip(labels[changed].tolist(), noisy[changed].tolist(), strict=True)
    out: dict[tuple[int, int], int] = {}
    for pair in pairs:
        out[pair] = out.get(pair, 0) + 1
    return out


@pytest.mark.parametrize(
    ("n", "rate", "expected"),
    [
        (1000, 0.4, 400),
        (1000, 0.0, 0),
        (1000, 0.8, 800),
        (7, 0.5, 4),  # round(3.5) = 4
        (5, 0.5, 2),  # round(2.5) = 2: Python rounds halves to even
        (3, 0.1, 0),  # round(0.3) = 0
    ],
)
def test_symmetric_noise_flips_exactly_round_rate_times_n(n, rate, expected):
    labels = torch.arange(n) % 10
    noisy = noisy_labels(labels, "symmetric", rate, seed=0, num_classes=10)
    # Every chosen example changes: a symmetric flip never lands on the example's own class.
    assert flipped(labels, noisy) == expected
    assert noisy.dtype == labels.dtype and noisy.shape == labels.shape
    assert labels.tolist() == (torch.arange(n) % 10).tolist()  # the input is left alone


def test_symmetric_noise_reaches_every_other_class_about_equally():
    labels = torch.full((9000,), CAT)
    noisy = noisy_labels(labels, "symmetric", 0.5, seed=3, num_classes=10)
    counts = torch.bincount(noisy, minlength=10)
    assert counts[CAT] == 4500  # round(0.5 * 9000) flipped, none back to cat
    others = torch.cat([counts[:CAT], counts[CAT + 1 :]])
    # 4,500 flips over 9 classes: 500 each expected, sd about 21; 400..600 is a wide margin.
    assert others.sum() == 4500 and others.min() > 400 and others.max() < 600


def test_asymmetric_noise_flips_only_the_similar_classes_at_the_rate_per_class():
    # Class c has 10 * (c + 1) examples: airplane 10, ..., bird 30, cat 40, deer 50, dog 60,
    # horse 80, truck 100.
    labels = torch.cat([torch.full((10 * (c + 1),), c) for c in range(10)])
    noisy = noisy_labels(labels, "asymmetric", 0.5, seed=0, num_classes=10)
    assert transitions(labels, noisy) == {
        (TRUCK, AUTOMOBILE): 50,  # round(0.5 * 100)
        (BIRD, AIRPLANE): 15,  # round(0.5 * 30)
        (CAT, DOG): 20,  # round(0.5 * 40)
        (DOG, CAT): 30,  # round(0.5 * 60)
        (DEER, HORSE): 25,  # round(0.5 * 50)
    }
    assert flipped(labels, noisy) == 140
    for untouched in (AIRPLANE, AUTOMOBILE, FROG, HORSE, SHIP):
        assert (noisy[labels == untouched] == untouched).all()


def test_asymmetric_counts_round_per_class():
    labels = torch.cat([torch.full((25,), DEER), torch.full((15,), BIRD), torch.full((9,), SHIP)])
    noisy = noisy_labels(labels, "asymmetric", 0.3, seed=1, num_classes=10)
    # round(7.5) = 8 deer, round(4.5) = 4 birds (halves to even), no ship.
    assert transitions(labels, noisy) == {(DEER, HORSE): 8, (BIRD, AIRPLANE): 4}


def test_the_same_seed_gives_the_same_labels_and_another_seed_others():
    labels = balanced(100)
    for kind in ("symmetric", "asymmetric"):
        a = noisy_labels(labels, kind, 0.4, seed=7, num_classes=10)
        b = noisy_labels(labels, kind, 0.4, seed=7, num_classes=10)
        c = noisy_labels(labels, kind, 0.4, seed=8, num_classes=10)
        assert torch.equal(a, b)
        assert not torch.equal(a, c) and flipped(labels, a) == flipped(labels, c)
    # The global random stream neither matters nor moves.
    torch.manual_seed(123)
    before = torch.random.get_rng_state()
    d = noisy_labels(labels, "symmetric", 0.4, seed=7, num_classes=10)
    assert torch.equal(torch.random.get_rng_state(), before)
    assert torch.equal(d, noisy_labels(labels, "symmetric", 0.4, seed=7, num_classes=10))


@pytest.mark.parametrize(
    ("kind", "rate", "num_classes", "says"),
    [
        ("pairflip", 0.4, 10, "Unknown label noise 'pairflip'"),
        ("symmetric", 1.0, 10, "must be in [0, 1); got 1.0"),
        ("symmetric", -0.1, 10, "must be in [0, 1); got -0.1"),
        ("asymmetric", 0.4, 100, "these labels have 100 classes"),
    ],
)
def test_bad_arguments_are_refused(kind, rate, num_classes, says):
    with pytest.raises(NormbenchError) as err:
        noisy_labels(balanced(10), kind, rate, seed=0, num_classes=num_classes)
    assert says in str(err.value)


def test_labels_outside_the_classes_are_refused():
    with pytest.raises(NormbenchError, match=r"class indices in \[0, 10\)"):
        noisy_labels(torch.tensor([0, 10]), "symmetric", 0.5, seed=0, num_classes=10)
    with pytest.raises(NormbenchError, match="1-D tensor of integer"):
        noisy_labels(torch.zeros(4), "symmetric", 0.5, seed=0, num_classes=10)


def test_the_real_cifar10_classes_are_in_the_order_the_asymmetric_map_assumes(cifar_dir):
    train = load_dataset("cifar10", "train", cifar_dir).subset(5000, seed=0)
    assert train.classes == CIFAR10_CLASSES
    noisy, info = noisy_training_set(train, {"type": "asymmetric", "rate": 0.4, "seed": 0})
    n = torch.bincount(train.labels, minlength=10)
    expected = sum(round(0.4 * int(n[c])) for c in (TRUCK, BIRD, CAT, DOG, DEER))
    assert info == {
        "type": "asymmetric", "rate": 0.4, "seed": 0, "flipped": expected,
        "examples": 5000, "rate_actual": expected / 5000,
    }  # fmt: skip
    assert flipped(train.labels, noisy.labels) == expected
    assert noisy.images is train.images and noisy.classes == train.classes  # only labels change
    same, none = noisy_training_set(train, None)  # no label noise: the dataset itself
    assert same is train and none is None


def test_asymmetric_noise_on_other_classes_is_refused():
    other = ArrayDataset(
        torch.zeros(4, 3, 2, 2, dtype=torch.uint8), torch.tensor([0, 1, 2, 3]),
        tuple(f"class{i}" for i in range(10)), "test",
    )  # fmt: skip
    with pytest.raises(NormbenchError, match="needs CIFAR-10's classes"):
        noisy_training_set(other, {"type": "asymmetric", "rate": 0.4, "seed": 0})
    noisy, info = noisy_training_set(other, {"type": "symmetric", "rate": 0.5, "seed": 0})
    assert info["flipped"] == 2 and flipped(other.labels, noisy.labels) == 2
