"""FGSM and PGD (normbench.attacks): hand-computed cases on linear models, an independent
implementation (ART), a small network trained on real CIFAR-10, the runner's recording of a
model that cannot be attacked, suite validation, and a smoke run of the adversarial suite."""

from __future__ import annotations

import importlib.util
import json
import sqlite3

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import shared_data_dir, skip_or_fail
from helpers import TINY_SUITE, invoke, leaderboard_json
from torch import nn

from normbench import metrics as M
from normbench.attacks import (
    AttackSettings,
    NoInputGradient,
    adversarial_accuracy,
    fgsm,
    pgd,
    pixel_normalizer,
)
from normbench.data import CIFAR10_MEAN, CIFAR10_STD, ArrayDataset
from normbench.errors import SuiteError

CPU = torch.device("cpu")
EPS, STEP = 8 / 255, 2 / 255


def identity(x: torch.Tensor) -> torch.Tensor:
    return x


class TwoClassLinear(nn.Module):
    """logits = W x + b on 6 pixels (1, 3, 1, 2 images)."""

    def __init__(self) -> None:
        super().__init__()
        self.linear = nn.Linear(6, 2)
        with torch.no_grad():
            # W[1] - W[0] = [+2, -1, +0.5, -3, +1, -0.25]: the sign of the loss gradient for
            # label 0, since d CE / dx = p1 (W[1] - W[0]) with p1 > 0.
            self.linear.weight.copy_(
                torch.tensor([[0.0, 1.0, 0.0, 2.0, -1.0, 0.5], [2.0, 0.0, 0.5, -1.0, 0.0, 0.25]])
            )
            self.linear.bias.copy_(torch.tensor([0.1, -0.2]))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear(x.flatten(1))


# Pixels at the edges of [0, 1] and inside, so that clipping matters for some of them.
X = torch.tensor([[[[0.5, 0.0]], [[1.0, 0.99]], [[0.2, 0.3]]]])
LABEL = torch.tensor([0])
DIRECTION = torch.tensor([[[[1.0, -1.0]], [[1.0, -1.0]], [[1.0, -1.0]]]])  # sign(W[1] - W[0])


def test_fgsm_is_the_hand_computed_clipped_sign_step():
    # x + eps * sign(W[1] - W[0]), then clip: 0.0 - eps -> 0, 1.0 + eps -> 1.
    expected = torch.tensor(
        [[[[0.5 + EPS, 0.0]], [[1.0, 0.99 - EPS]], [[0.2 + EPS, 0.3 - EPS]]]], dtype=torch.float32
    )
    adv = fgsm(TwoClassLinear(), X, LABEL, eps=EPS, normalize=identity)
    assert adv.dtype == torch.float32 and adv.shape == X.shape
    assert torch.equal(adv, expected)
    # The normalization's positive std does not change the sign: same image through mean/std.
    norm = pixel_normalizer((0.5, 0.4, 0.3), (0.2, 0.3, 0.25), CPU)
    assert torch.equal(fgsm(TwoClassLinear(), X, LABEL, eps=EPS, normalize=norm), expected)


def test_pgd_without_random_start_walks_to_the_corner_of_the_ball():
    """On a two-class linear model every step has the same sign, so 5 steps of 0.03 reach the
    eps = 0.1 ball's corner after 4 (0.12 clamped to 0.1), then stay: clip(x + eps * sign)."""
    expected = (X + 0.1 * DIRECTION).clamp(0, 1)
    adv = pgd(TwoClassLinear(), X, LABEL, eps=0.1, step_size=0.03, steps=5, random_start=False,
              generator=None, normalize=identity)  # fmt: skip
    assert torch.allclose(adv, expected, atol=1e-7, rtol=0)
    # Two steps: 0.06 from x, inside the ball, clipped at 0 and 1.
    two = pgd(TwoClassLinear(), X, LABEL, eps=0.1, step_size=0.03, steps=2, random_start=False,
              generator=None, normalize=identity)  # fmt: skip
    assert torch.allclose(two, (X + 0.06 * DIRECTION).clamp(0, 1), atol=1e-7, rtol=0)


def ten_class_linear(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Flatten(), nn.Linear(3 * 4 * 4, 10))


def random_batch(n: int = 64, seed: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(n, 3, 4, 4, generator=g)
    x[:8] = (x[:8] > 0.5).float()  # some pixels exactly at 0 and 1
    return x, torch.randint(0, 10, (n,), generator=g)


def test_pgd_iterates_stay_in_the_ball_and_in_pixel_range_and_are_reproducible():
    model, (x, y) = ten_class_linear(), random_batch()
    norm = pixel_normalizer(CIFAR10_MEAN, CIFAR10_STD, CPU)

    def run(steps: int, seed: int) -> torch.Tensor:
        return pgd(model, x, y, eps=EPS, step_size=STEP, steps=steps, random_start=True,
                   generator=torch.Generator().manual_seed(seed), normalize=norm)  # fmt: skip

    # With one seed, the run of k steps is the first k iterates of a longer run.
    for steps in range(0, 8):
        adv = run(steps, seed=3)
        assert adv.min() >= 0 and adv.max() <= 1
        assert (adv - x).abs().max() <= EPS + 1e-7
    start = run(0, seed=3)
    assert (start - x).abs().max() > EPS / 2  # a real random start, not the clean image
    assert torch.equal(run(5, seed=3), run(5, seed=3))
    assert not torch.equal(run(5, seed=3), run(5, seed=4))


def test_attacks_leave_the_model_as_they_found_it():
    model, (x, y) = ten_class_linear(), random_batch()
    model[1].bias.requires_grad_(False)  # a frozen parameter stays frozen
    model.train()
    pgd(model, x, y, eps=EPS, step_size=STEP, steps=3, random_start=True,
        generator=torch.Generator().manual_seed(0), normalize=identity)  # fmt: skip
    fgsm(model, x, y, eps=EPS, normalize=identity)
    assert model.training
    assert [p.requires_grad for p in model.parameters()] == [True, False]
    assert all(p.grad is None for p in model.parameters())


def test_pgd_with_a_random_start_needs_a_generator():
    model, (x, y) = ten_class_linear(), random_batch()
    with pytest.raises(ValueError, match="generator"):
        pgd(model, x, y, eps=EPS, step_size=STEP, steps=1, random_start=True, generator=None,
            normalize=identity)  # fmt: skip


def test_fgsm_and_pgd_match_art_exactly():
    """The Adversarial Robustness Toolbox's FGSM and PGD (no random start), an independent
    implementation, give the same images bit for bit on a 10-class linear model."""
    if importlib.util.find_spec("art") is None:
        skip_or_fail(
            "the Adversarial Robustness Toolbox is not installed (pip install -e '.[dev]')"
        )
    from art.attacks.evasion import FastGradientMethod, ProjectedGradientDescentPyTorch
    from art.estimators.classification import PyTorchClassifier

    model, (x, y) = ten_class_linear(), random_batch()
    mean, std = CIFAR10_MEAN, CIFAR10_STD
    classifier = PyTorchClassifier(
        model=model, loss=nn.CrossEntropyLoss(), input_shape=(3, 4, 4), nb_classes=10,
        clip_values=(0.0, 1.0),
        preprocessing=tuple(np.array(v, dtype=np.float32).reshape(3, 1, 1) for v in (mean, std)),
    )  # fmt: skip
    norm = pixel_normalizer(mean, std, CPU)
    theirs = FastGradientMethod(classifier, norm=np.inf, eps=EPS, eps_step=EPS).generate(
        x.numpy(), y=y.numpy()
    )
    ours = fgsm(model, x, y, eps=EPS, normalize=norm)
    assert np.array_equal(theirs, ours.numpy())
    assert (ours != x).any()
    theirs = ProjectedGradientDescentPyTorch(
        classifier, norm=np.inf, eps=EPS, eps_step=STEP, max_iter=10, num_random_init=0,
        batch_size=len(x), verbose=False,
    ).generate(x.numpy(), y=y.numpy())  # fmt: skip
    ours = pgd(model, x, y, eps=EPS, step_size=STEP, steps=10, random_start=False,
               generator=None, normalize=norm)  # fmt: skip
    assert np.array_equal(theirs, ours.numpy())


class Detached(nn.Module):
    """A model whose output does not depend differentiably on its input."""

    def __init__(self, pixels: int, frozen: bool = False) -> None:
        super().__init__()
        self.linear = nn.Linear(pixels, 10).requires_grad_(not frozen)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear(x.detach().flatten(1))


@pytest.mark.parametrize("frozen", [False, True])
def test_a_model_without_input_gradient_is_refused_with_a_reason(frozen):
    x, y = random_batch()
    with pytest.raises(NoInputGradient, match="gradient attacks cannot be applied"):
        fgsm(Detached(48, frozen), x, y, eps=EPS, normalize=identity)


def test_the_run_records_why_a_model_was_not_attacked():
    from normbench.suites import load_suite, plan
    from runners.classify import RunResult, evaluate_adversarial

    spec = plan(load_suite("adversarial"), "smoke", norms=["batchnorm"])[0]
    g = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (20, 3, 32, 32), dtype=torch.uint8, generator=g)
    test_set = ArrayDataset(images, torch.randint(0, 10, (20,), generator=g), ("c",) * 10, "t")
    result = RunResult(status="finished")
    rows = evaluate_adversarial(Detached(3 * 32 * 32), spec, test_set, CPU, result)
    assert rows == []
    info = result.info["adversarial"]
    assert "gradient attacks cannot be applied" in info["not_measured"]
    assert info["images"] == 20 and info["steps"] == 5 and info["eps"] == EPS


@pytest.fixture(scope="module")
def trained(one_thread):
    """A narrow fast net trained for 48 steps on 2,048 real CIFAR-10 images (about 30% test
    accuracy), and 200 real test images."""
    data = shared_data_dir()
    if data is None:
        skip_or_fail("real CIFAR-10 mirror not found (see tests/conftest.py)")
    from normbench.data import TensorLoader, load_cifar10
    from normbench.models import conv_norm_factory, create_model

    train = load_cifar10("train", data).subset(2048, seed=0)
    test = load_cifar10("test", data).subset(200, seed=0)
    torch.manual_seed(0)
    model = create_model("fastnet", block=conv_norm_factory("batchnorm"), num_classes=10,
                         widths=[8, 16, 16, 16])  # fmt: skip
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, nesterov=True)
    loader = TensorLoader(train, 128, device=CPU, train=True, flip=True)
    for _ in range(3):
        for x, y in loader:
            optimizer.zero_grad()
            F.cross_entropy(model(x), y).backward()
            optimizer.step()
    return model, test


def attack(model, test, **overrides) -> object:
    settings = AttackSettings(**({"steps": 10, "batch_size": 64} | overrides))
    return adversarial_accuracy(
        model, test.images, test.labels, settings,
        generator=torch.Generator().manual_seed(0),
        normalize=pixel_normalizer(CIFAR10_MEAN, CIFAR10_STD, CPU),
    )  # fmt: skip


def test_pgd_with_eps_zero_is_clean_accuracy(trained):
    model, test = trained
    acc = attack(model, test, eps=0.0)
    assert acc.images == 200
    assert acc.clean == acc.fgsm == acc.pgd
    assert acc.clean > 0.2  # the net learned something, so the equality is not 0 == 0


def test_accuracy_falls_from_clean_to_fgsm_to_pgd(trained):
    model, test = trained
    acc = attack(model, test)
    assert acc.clean >= acc.fgsm >= acc.pgd
    assert acc.pgd < acc.clean
    # The clean accuracy is the model's own on these images, normalized as the run's loaders do
    # (in another order of operations: a borderline image may differ by rounding).
    from normbench.data import TensorLoader

    model.eval()
    with torch.no_grad():
        ((x, y),) = TensorLoader(test, len(test), device=CPU, train=False)
        own = (model(x).argmax(1) == y).float().mean().item()
    assert acc.clean == pytest.approx(own, abs=2 / 200)
    # Batches are independent in eval mode: another batch size, the same clean and FGSM counts.
    other = attack(model, test, batch_size=200)
    assert (other.clean, other.fgsm) == (acc.clean, acc.fgsm)


def test_suite_refuses_bad_adversarial_settings(tmp_path):
    from normbench.suites import load_suite_file

    for line, says in (
        ("adversarial = { subset = 0 }", "adversarial.subset"),
        ("adversarial = { eps = -0.1 }", "adversarial.eps"),
        ("adversarial = { steps = 20, restarts = 2 }", "adversarial.restarts: unknown key"),
    ):
        path = tmp_path / "bad.toml"
        path.write_text(TINY_SUITE.format(name="bad", lr=0.1) + line + "\n")
        with pytest.raises(SuiteError, match=says):
            load_suite_file(path)


def test_builtin_adversarial_suite_follows_the_papers_protocol():
    """eps 8/255 everywhere; PGD-20 with step 2/255 and a random start on 1,000 (cpu) and all
    10,000 (full) test images; the four norms with SGD, fp32 on CPU cores."""
    from normbench.suites import load_suite, plan

    suite = load_suite("adversarial")
    for budget, images, steps in (("smoke", 100, 5), ("cpu", 1000, 20), ("full", 10000, 20)):
        specs = plan(suite, budget)
        assert {s.norm for s in specs} == {"batchnorm", "groupnorm", "layernorm", "convnorm"}
        assert {s.optimizer for s in specs} == {"sgd"}
        options = specs[0].settings["adversarial"]
        assert options == {"subset": images, "eps": EPS, "step_size": STEP, "steps": steps,
                           "random_start": True, "batch_size": 500}  # fmt: skip
    cpu = plan(suite, "cpu")[0].settings
    assert cpu["precision"] == "fp32" and cpu["model_args"] == {"widths": [16, 32, 64, 128]}


@pytest.fixture(scope="module")
def adversarial_db(tmp_path_factory, session_cache):
    """A results database written by a real CLI run of a seconds-long suite with the adversarial
    option (the adversarial suite's smoke budget takes a minute on two busy cores)."""
    data = shared_data_dir()
    if data is None:
        skip_or_fail("real CIFAR-10 mirror not found (see tests/conftest.py)")
    folder = tmp_path_factory.mktemp("adversarial")
    suite = folder / "tiny-adversarial.toml"
    suite.write_text(
        TINY_SUITE.format(name="tiny-adversarial", lr=0.2)
        + "adversarial = { subset = 64, steps = 3, batch_size = 32 }\n"
    )
    db = folder / "results.db"
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("NORMBENCH_CACHE_DIR", str(session_cache))
        result = invoke("run", f"--suite={suite}", "--budget=smoke", f"--db={db}",
                        f"--data-dir={data}")  # fmt: skip
    assert result.exit_code == 0, result.output
    return suite, db


def test_a_run_writes_the_three_accuracies_and_the_board_shows_them(adversarial_db):
    suite, db = adversarial_db
    (row,) = leaderboard_json(str(db), suite=str(suite))
    values = [row[f"{name}_mean"] for name in (M.ADV_CLEAN_ACCURACY, M.FGSM_ACCURACY,
                                               M.PGD_ACCURACY)]  # fmt: skip
    assert all(0 <= v <= 1 for v in values)
    assert values[0] >= values[2]
    with sqlite3.connect(db) as conn:
        (provenance,) = conn.execute("SELECT provenance FROM runs").fetchone()
        splits = conn.execute(
            "SELECT DISTINCT split FROM metrics WHERE name IN (?, ?, ?)",
            (M.ADV_CLEAN_ACCURACY, M.FGSM_ACCURACY, M.PGD_ACCURACY),
        ).fetchall()
    assert splits == [("test",)]
    info = json.loads(provenance)["adversarial"]
    assert info["images"] == 64 and info["steps"] == 3 and info["eps"] == EPS
    assert info["random_start"] is True and info["random_start_seed"] == 0
    table = invoke("leaderboard", f"--suite={suite}", "--budget=smoke", f"--db={db}")
    assert "FGSM acc %" in table.output and "PGD acc %" in table.output
    assert "not an AutoAttack evaluation" in table.output


def test_dashboard_leaderboard_shows_the_attack_columns(monkeypatch, adversarial_db):
    from conftest import REPO
    from streamlit.testing.v1 import AppTest

    _, db = adversarial_db
    monkeypatch.setenv("NORMBENCH_DB", str(db))
    at = AppTest.from_file(str(REPO / "dashboard" / "app.py"), default_timeout=60)
    at.run()
    assert not at.exception, at.exception
    assert at.selectbox(key="suite").value == "tiny-adversarial"
    view = at.dataframe[0].value
    columns = ["adv. subset clean %", "FGSM acc %", "PGD acc %"]
    assert [c for c in view.columns if c in columns] == columns
    (pgd_cell,) = view["PGD acc %"]
    assert pgd_cell != "-"
    assert any("not an AutoAttack evaluation" in c.value for c in at.caption)
