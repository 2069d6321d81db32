"""Test-time adaptation (normbench.adaptation): BN adaptation and TENT on a tiny BatchNorm net
trained on real CIFAR-10, which layers switch to batch statistics for each norm, and the
cifar-c-tta suite end to end through the command line."""

from __future__ import annotations

import copy
import json
import sqlite3
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from conftest import MISSING_CIFAR, REPO, shared_data_dir, skip_or_fail, smoke_db
from helpers import invoke, leaderboard_json

from normbench.adaptation import (
    batch_statistics,
    batch_stats_modules,
    bn_adapt,
    softmax_entropy,
    tent,
)
from normbench.corruptions import corrupt
from normbench.data import NORMALIZATION, ArrayDataset, TensorLoader, load_cifar10
from normbench.models import conv_norm_factory, create_model
from normbench.norms import BatchNorm, affine_parameters

MEAN, STD = NORMALIZATION["cifar10"]
CPU = torch.device("cpu")
WIDTHS = [8, 16, 16, 16]


def tiny_model(norm: str) -> torch.nn.Module:
    return create_model("fastnet", block=conv_norm_factory(norm), num_classes=10, widths=WIDTHS).to(
        memory_format=torch.channels_last
    )


def loader(ds: ArrayDataset, batch_size: int) -> TensorLoader:
    return TensorLoader(ds, batch_size, device=CPU, train=False, mean=MEAN, std=STD)


def first(ds: ArrayDataset, n: int) -> ArrayDataset:
    return ArrayDataset(ds.images[:n].contiguous(), ds.labels[:n].contiguous(), ds.classes, "t")


@pytest.fixture(scope="module")
def trained(one_thread):
    """A BatchNorm fastnet trained for 2 epochs on 4,096 real CIFAR-10 images (about 40% test
    accuracy), with its running statistics then recomputed as exact averages over those
    training images (no augmentation): population statistics of the final weights, so that a
    test batch's own statistics differ from them only by sampling noise and the train/test
    shift. Also the first 1,000 test images."""
    data = shared_data_dir()
    if data is None:
        skip_or_fail(MISSING_CIFAR)
    train, test = first(load_cifar10("train", data), 4096), first(load_cifar10("test", data), 1000)
    torch.manual_seed(0)
    model = tiny_model("batchnorm")
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, nesterov=True)
    batches = TensorLoader(train, 128, device=CPU, train=True, flip=True, mean=MEAN, std=STD)
    model.train()
    for _ in range(2):
        for x, y in batches:
            optimizer.zero_grad()
            F.cross_entropy(model(x), y).backward()
            optimizer.step()
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, BatchNorm):
                m.reset_running_stats()
                m.momentum = None  # cumulative average
        for x, _ in loader(train, 512):
            model(x)
    return model.eval(), test


def plain_accuracy(model, batches) -> float:
    model.eval()
    with torch.inference_mode():
        hits = [(model(x).argmax(1) == y).float() for x, y in batches]
    return torch.cat(hits).mean().item()


def state(model) -> dict:
    """A copy of the model's state (noisy BatchNorm adds a non-tensor extra state)."""
    return copy.deepcopy(model.state_dict())


def same_state(before: dict, model) -> bool:
    """Every tensor bit-identical (and every other entry equal) to ``before``."""
    after = model.state_dict()
    return before.keys() == after.keys() and all(
        torch.equal(v, after[k]) if isinstance(v, torch.Tensor) else v == after[k]
        for k, v in before.items()
    )


def test_bn_adaptation_on_clean_images_keeps_accuracy_and_leaves_the_model_as_it_was(trained):
    model, test = trained
    before = state(model)
    plain = plain_accuracy(model, loader(test, 200))
    adapted = bn_adapt(model, loader(test, 200))
    assert plain > 0.25  # trained: far above chance (0.1)
    # Batches of 200 clean images estimate the population statistics closely: 2 points (20 of
    # the 1,000 images) is several times the differences such batches cause, and far below the
    # loss from estimates that are bad (batches of one image, below).
    assert adapted.accuracy == pytest.approx(plain, abs=0.02)
    assert len(adapted.logits) == 1000 and torch.equal(adapted.labels, test.labels)
    assert same_state(before, model)
    assert not model.training
    assert all(
        m.track_running_stats and m.running_mean is not None for m in batch_stats_modules(model)
    )


def test_bn_adaptation_from_single_images_is_far_worse_than_from_large_batches(trained):
    model, test = trained
    single = bn_adapt(model, loader(first(test, 300), 1)).accuracy
    large = bn_adapt(model, loader(first(test, 300), 300)).accuracy
    # One image gives each channel its instance statistics: the net sees inputs unlike any in
    # training and falls to about chance.
    assert single < 0.2 < large - 0.1


def test_bn_adaptation_helps_under_a_shift_in_statistics(trained):
    """Contrast at severity 5 rescales every channel: exactly the shift that new statistics
    undo, so adaptation recovers much of the clean accuracy."""
    model, test = trained
    shifted = ArrayDataset(corrupt(test.images, "contrast", 5), test.labels, test.classes, "c")
    plain = plain_accuracy(model, loader(shifted, 200))
    assert bn_adapt(model, loader(shifted, 200)).accuracy > plain + 0.05


def test_tent_learns_only_the_affine_parameters_of_a_copy_and_lowers_the_entropy(trained):
    model, test = trained
    before = state(model)
    noisy = corrupt(first(test, 200).images, "gaussian_noise", 5)
    x, y = next(iter(loader(ArrayDataset(noisy, test.labels[:200], test.classes, "n"), 200)))
    result = tent(model, [(x, y)] * 5)
    # The same batch five times: each step lowers the entropy the next forward sees.
    assert result.entropy[-1] < result.entropy[0]
    assert all(b < a for a, b in zip(result.entropy, result.entropy[1:], strict=False))
    assert result.entropy[0] == pytest.approx(softmax_entropy(result.logits[:200]).mean().item())
    assert same_state(before, model)  # the trained model: untouched
    work = result.model
    assert work is not model
    affine = {id(p) for p in affine_parameters(work)}
    names = {n for n, p in work.named_parameters() if id(p) in affine}
    assert names and all(n.endswith((".weight", ".bias")) for n in names)
    adapted = work.state_dict()
    changed = {k for k in before if not torch.equal(before[k], adapted[k])}
    assert changed and changed <= names  # every parameter and buffer but the affine ones: same
    assert all(p.requires_grad for p in work.parameters())


def test_tent_predicts_each_batch_before_its_update_and_carries_the_state_on(trained):
    model, test = trained
    b1, b2 = list(loader(first(test, 200), 100))
    both = tent(model, [b1, b2])
    # batch 1: the trained model with batch statistics, as BN adaptation predicts it
    torch.testing.assert_close(both.logits[:100], bn_adapt(model, [b1]).logits)
    # batch 2: the model as adapted on batch 1, before batch 2's own step
    after_one = tent(model, [b1]).model
    with torch.inference_mode(), batch_statistics(after_one):
        expected = after_one(b2[0]).float()
    torch.testing.assert_close(both.logits[100:], expected)
    assert not torch.equal(both.logits[100:], bn_adapt(model, [b2]).logits)


@pytest.mark.parametrize("norm", ["variancenorm", "evonorm_b0", "convnorm", "noisy_batchnorm"])
def test_every_batch_statistics_norm_switches_and_is_put_back_bit_for_bit(norm, one_thread):
    torch.manual_seed(1)
    model = tiny_model(norm)
    x = torch.randn(16, 3, 32, 32).contiguous(memory_format=torch.channels_last)
    with torch.no_grad():  # running statistics away from their initial values
        model.train()
        for _ in range(3):
            model(x * 2 + 1)
    model.eval()
    before = state(model)
    switched = batch_stats_modules(model)
    assert switched and all(type(m).__name__ != "ConvNorm" for m in switched)
    with torch.inference_mode():
        plain = model(x)
        adapted = bn_adapt(model, [(x, torch.zeros(16, dtype=torch.long))]).logits
        again = bn_adapt(model, [(x, torch.zeros(16, dtype=torch.long))]).logits
    assert not torch.allclose(adapted, plain)  # the batch's statistics, not the running ones
    assert torch.equal(adapted, again)  # no noise, nothing carried over
    assert same_state(before, model)
    assert not any(m.training for m in model.modules())


def test_noisy_batchnorm_adapts_like_batchnorm_without_its_training_noise(one_thread):
    torch.manual_seed(2)
    noisy = tiny_model("noisy_batchnorm").eval()
    plain = tiny_model("batchnorm").eval()
    weights = {k: v for k, v in noisy.state_dict().items() if not k.endswith("_extra_state")}
    plain.load_state_dict(weights)
    x = torch.randn(8, 3, 32, 32).contiguous(memory_format=torch.channels_last)
    batch = [(x, torch.zeros(8, dtype=torch.long))]
    torch.testing.assert_close(bn_adapt(noisy, batch).logits, bn_adapt(plain, batch).logits)


def test_norms_without_batch_statistics_are_refused_with_the_reason(cifar_dir):
    result = invoke(
        "run", "--suite=cifar-c-tta", "--budget=smoke", "--norms=layernorm", "--optimizers=sgd",
        "--seeds=0",
    )  # fmt: skip
    assert result.exit_code == 2, result.output
    assert "'layernorm' has none" in result.output and "batch statistics" in result.output
    assert "batchnorm" in result.output  # it names the norms that qualify


@pytest.fixture(scope="module")
def tta_smoke_db(tmp_path_factory, session_cache) -> Path:
    """A results database written by a real cifar-c-tta smoke run of batchnorm + SGD, seed 0."""
    return smoke_db(tmp_path_factory, session_cache, "cifar-c-tta", "batchnorm")


def test_smoke_run_stores_plain_and_adapted_accuracies_side_by_side(tta_smoke_db):
    db = tta_smoke_db
    with sqlite3.connect(db) as conn:
        counts = dict(
            conn.execute(
                "SELECT name, count(*) FROM metrics WHERE name IN "
                "('accuracy', 'accuracy_bn_adapt', 'accuracy_tent') GROUP BY name"
            ).fetchall()
        )
        summary = dict(
            conn.execute(
                "SELECT name, value FROM metrics WHERE corruption = '' AND name LIKE '%accuracy%'"
            ).fetchall()
        )
        (info,) = conn.execute("SELECT provenance FROM runs").fetchone()
    # clean + 19 corruptions x 5 severities + 19 per-corruption means, for each of the three
    assert counts == {"accuracy": 115, "accuracy_bn_adapt": 115, "accuracy_tent": 115}
    for name in ("corruption_accuracy", "accuracy_bn_adapt", "accuracy_tent",
                 "corruption_accuracy_bn_adapt", "corruption_accuracy_tent"):  # fmt: skip
        assert 0.0 <= summary[name] <= 1.0
    adaptation = json.loads(info)["adaptation"]
    assert adaptation["methods"] == ["bn", "tent"] and adaptation["batch_size"] == 25
    (row,) = leaderboard_json(str(db), suite="cifar-c-tta")
    assert row["corruption_accuracy_tent_mean"] == pytest.approx(
        summary["corruption_accuracy_tent"]
    )
    table = invoke("leaderboard", "--suite=cifar-c-tta", "--budget=smoke", f"--db={db}")
    assert table.exit_code == 0, table.output
    assert "BN-adapt / TENT:" in table.output  # the columns' legend, only when they are there
    for name in ("corruption_accuracy", "corruption_accuracy_bn_adapt", "corruption_accuracy_tent"):
        assert f"{100 * summary[name]:.2f}" in table.output


def test_dashboard_shows_plain_and_adapted_accuracy_side_by_side(monkeypatch, tta_smoke_db):
    from streamlit.testing.v1 import AppTest

    monkeypatch.setenv("NORMBENCH_DB", str(tta_smoke_db))
    at = AppTest.from_file(str(REPO / "dashboard" / "app.py"), default_timeout=60)
    at.run()
    at.switch_page("views/robustness.py")
    at.run()
    assert not at.exception, at.exception
    assert at.subheader[-1].value == "Test-time adaptation: plain vs adapted accuracy"
    assert len(at.get("vega_lite_chart")) == 3  # heat map, severity curves, plain vs adapted
    side = at.dataframe[1].value
    assert list(side.columns[:5]) == ["pair", "corruption", "plain", "BN-adapt", "TENT"]
    assert len(side) == 19  # one pair, every corruption
    gain = side["TENT gain"] - (side["TENT"] - side["plain"])
    assert gain.abs().max() < 1e-9
    with sqlite3.connect(tta_smoke_db) as conn:
        (fog,) = conn.execute(
            "SELECT value FROM metrics WHERE name = 'accuracy_tent' AND corruption = 'fog' "
            "AND severity = 0"
        ).fetchone()
    assert side.set_index("corruption").loc["fog", "TENT"] == pytest.approx(100 * fog)
    at.selectbox(key="severity_corruption").set_value("contrast").run()
    assert not at.exception, at.exception
