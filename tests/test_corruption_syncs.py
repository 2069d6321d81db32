"""Host reads of the corruption engine, counted on the CPU.

On a GPU every value Python reads back from the device (``.item()``, ``.tolist()``, ``bool`` of
a tensor, ``torch.equal`` in a loop's test) makes the host wait for all the work queued before
it; generating CIFAR-10-C on a GPU is then bound by those waits. The reads are counted here
through the Python-visible hooks, on the CPU, where the engine runs the same code: each
corruption's count per call is held at or below what it is now, and the loops that check for
convergence are checked to give the same result as checking after every step.
"""

from __future__ import annotations

import contextlib

import pytest
import torch
import torch.nn.functional as F
from helpers import cifar_test_images

from normbench.corruptions import ALL, ImageRng, blur, corrupt, geometric, weather
from normbench.corruptions.blur import glass_offsets, glass_shuffle
from normbench.corruptions.geometric import fold_index
from normbench.corruptions.ops import border_index, rgb_to_gray
from normbench.corruptions.tables import CIFAR

pytestmark = pytest.mark.usefixtures("one_thread")

#: Tensor methods through which Python code reads a tensor's values back to the host.
HOST_READS = (
    "item", "tolist", "numpy", "__bool__", "__float__", "__int__", "__index__", "__format__",
)  # fmt: skip

#: Host reads per ``corrupt`` call on 8 CIFAR-10 test images (uint8) at severity 3, after a
#: first call has built the cached kernels and constants. Every corruption not named makes none.
#: What the remaining reads are (and the counts before the needless ones were removed):
#:
#: - motion_blur, snow: ImageMagick's tap offsets are computed in Python from the blur angles,
#:   one ``tolist`` of the angles, which are drawn on the CPU (a read of host memory, no wait).
#:   Both 1 before.
#: - elastic_transform: ``fold_index`` reads the bounds of its indices (one ``bool``, 4 folds per
#:   bilinear sampling, two samplings) to skip an integer remainder on the CPU, where the read is
#:   free; on an accelerator it always takes the remainder and reads nothing (tested below).
#:   16 before (two reads per fold).
#: - spatter (water, mode 0): Canny's hysteresis and the chamfer distance transform iterate to
#:   a fixed point; one ``torch.equal`` per 8 dilations and per 4 relaxation steps: 1 + 2 here.
#:   15 before (8 comparisons, one per 4 dilations and one per relaxation step, and 7 reads of
#:   filter taps).
#:
#: Brought to 0: gaussian_blur (2 before: SciPy's taps read per call), glass_blur (5: 4 reads
#: of the taps and a check after the first pointer jump; with a shuffle distance of 1, as in
#: every CIFAR severity, there are no chains to follow) and defocus_blur (1: its kernel sent to
#: the device and read back).
CIFAR_READS = {"motion_blur": 1, "snow": 1, "elastic_transform": 8, "spatter": 3}

#: ``torch.equal`` calls per call on one ImageNet-size (224 x 224) image (the first test image,
#: upsampled) at severity 3, the only host reads left there: glass blur's three shuffle passes
#: at distance 2 (14 before, one per pointer jump, and 4 reads of filter taps), spatter's water
#: (14 before, and 7 reads of filter taps).
IMAGENET_CHECKS = {"glass_blur": 5, "spatter": 4}


@contextlib.contextmanager
def count_host_reads():
    """Count the calls of every HOST_READS method of torch.Tensor, and of ``torch.equal``."""
    calls: list[str] = []
    saved = {name: getattr(torch.Tensor, name) for name in HOST_READS}

    def counting(name, method):
        def wrapper(*args, **kwargs):
            calls.append(name)
            return method(*args, **kwargs)

        return wrapper

    for name, method in saved.items():
        setattr(torch.Tensor, name, counting(name, method))
    equal = torch.equal
    torch.equal = counting("equal", equal)
    try:
        yield calls
    finally:
        for name, method in saved.items():
            setattr(torch.Tensor, name, method)
        torch.equal = equal


@pytest.fixture
def images(cifar_dir) -> torch.Tensor:
    return cifar_test_images(str(cifar_dir), 8)


def reads_of(images: torch.Tensor, name: str, severity: int) -> tuple[torch.Tensor, list[str]]:
    """The result of a second call (the first builds the caches) and the reads it made."""
    corrupt(images, name, severity, seed=1)
    with count_host_reads() as calls:
        out = corrupt(images, name, severity, seed=1)
    return out, calls


def test_the_counter_sees_reads_and_comparisons():
    x = torch.arange(4.0)
    with count_host_reads() as calls:
        assert x.sum().item() == 6 and x.tolist()[1] == 1 and bool(x[1] > 0)
        assert torch.equal(x, x) and int(x[2]) == 2
    assert calls == ["item", "tolist", "__bool__", "equal", "__int__"]


@pytest.mark.parametrize("name", ALL)
def test_host_reads_per_corruption_stay_within_the_table(images, name, record_property):
    _, calls = reads_of(images, name, 3)
    record_property("host_reads", len(calls))
    assert len(calls) <= CIFAR_READS.get(name, 0), f"{name}: {calls}"


@pytest.mark.parametrize("name", sorted(IMAGENET_CHECKS))
def test_convergence_checks_at_imagenet_size(images, name):
    big = F.interpolate(images[:1].float(), size=(224, 224), mode="bilinear")
    _, calls = reads_of(big.round().to(torch.uint8), name, 3)
    assert calls.count("equal") <= IMAGENET_CHECKS[name], calls
    assert set(calls) <= {"equal"}, calls


def test_fold_index_reads_nothing_where_reads_wait_for_a_device(images, monkeypatch):
    """The accelerator path (always the remainder, no read of the bounds), run on the CPU: the
    same folds and the same elastic_transform bytes, with no host read."""
    near_and_far = {}
    for n in (1, 2, 5, 32):
        for span in (n, 3 * n + 7):
            near_and_far[n, span] = torch.arange(-span, n + span)
    expected = {severity: reads_of(images, "elastic_transform", severity)[0] for severity in (1, 3)}

    monkeypatch.setattr(geometric, "_reads_are_free", lambda t: False)
    for mode in ("reflect", "mirror"):
        for (n, span), i in near_and_far.items():
            with count_host_reads() as calls:
                folded = fold_index(i, n, mode)
            assert calls == [] and torch.equal(folded, border_index(n, span, mode))
    for severity, before in expected.items():
        out, calls = reads_of(images, "elastic_transform", severity)
        assert calls == [] and torch.equal(out, before)


def _equal_calls(fn):
    """``fn()``'s result and its number of ``torch.equal`` calls."""
    with count_host_reads() as calls:
        out = fn()
    return out, calls.count("equal")


def test_glass_shuffle_checks_every_few_jumps_with_the_same_result(monkeypatch):
    # distance 3 on 64 x 64: chains of reads a few jumps long
    x = torch.rand(2, 3, 64, 64, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    dx, dy = glass_offsets(64, 64, 3, ImageRng([1, 2]))
    few, few_checks = _equal_calls(lambda: glass_shuffle(x, dx, dy, 3))
    monkeypatch.setattr(blur, "_JUMPS_PER_CHECK", 1)
    every, every_checks = _equal_calls(lambda: glass_shuffle(x, dx, dy, 3))
    assert torch.equal(few, every)
    assert every_checks >= 3 and few_checks < every_checks
    # distance 1: nothing to follow, nothing to check
    dx, dy = glass_offsets(64, 64, 1, ImageRng([1, 2]))
    assert _equal_calls(lambda: glass_shuffle(x, dx, dy, 1))[1] == 0


def test_canny_and_chamfer_check_every_few_steps_with_the_same_result(images, monkeypatch):
    """Canny's hysteresis (on real images' gray levels: long chains of weak edges) and the
    chamfer relaxation (from the sparse edges of real spatter layers: long distances) reach the
    fixed point they reach when checked after every step."""
    gray = rgb_to_gray(images.double())[:, 0].floor().long()
    params = CIFAR["spatter"][0]  # water, the thinnest layer
    normal = weather.spatter_draws(32, 32, params, ImageRng(range(8)))
    layer = torch.floor(weather.spatter_liquid(normal, params)[:, 0] * 255).long() & 255
    layer_edges = weather.canny(layer, 50, 150)

    def edges_and_distance():
        return weather.canny(gray, 50, 150), weather.chamfer_distance(layer_edges, 20.0)

    (edges, dist), few_checks = _equal_calls(edges_and_distance)
    monkeypatch.setattr(weather, "_DILATIONS_PER_CHECK", 1)
    monkeypatch.setattr(weather, "_RELAXATIONS_PER_CHECK", 1)
    (every_edges, every_dist), every_checks = _equal_calls(edges_and_distance)
    assert torch.equal(edges, every_edges) and torch.equal(dist, every_dist)
    # weak edges joined to strong ones, and pixels more than 15 from an edge
    assert (edges & ~weather.canny(gray, 149, 150)).any() and dist.max() > 15
    assert every_checks > 3 * few_checks
