"""Initialization probes (Lubana et al. 2021): the statistics against hand computations, the
gradient norms against autograd, a probe that leaves its model untouched, non-finite activations,
a real finding (BatchNorm keeps activation growth small), and probe runs on real CIFAR-10:
rows, determinism, training between probes, divergence and resuming from a checkpoint."""

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from normbench import metrics as M
from normbench.errors import NormbenchError
from normbench.models import conv_norm_factory, create_model
from normbench.probes import ProbeResult, activation_variance, gram_statistics, init_probe
from normbench.suites import RunSpec
from runners import probe as probe_runner
from runners.classify import Progress

PER_BLOCK = [
    M.PROBE_ACT_VAR, M.PROBE_ACT_VAR_STD, M.PROBE_COSINE, M.PROBE_COSINE_STD,
    M.PROBE_STABLE_RANK, M.PROBE_STABLE_RANK_STD,
]  # fmt: skip
PER_CONV = [M.PROBE_GRAD_NORM, M.PROBE_GRAD_NORM_STD]
SUMMARIES = [M.PROBE_ACT_GROWTH, M.PROBE_LAST_COSINE, M.PROBE_LAST_STABLE_RANK, M.PROBE_GRAD_RATIO]


@pytest.fixture(autouse=True)
def _one_thread(one_thread):
    """Small batched ops: one intra-op thread (see conftest)."""


# --- the statistics -----------------------------------------------------------------------------


def test_activation_variance_is_the_channel_mean_of_biased_per_channel_variances():
    # Channel 0 holds 1, 3, 5, 7 over (N, H, W): mean 4, variance (9 + 1 + 1 + 9) / 4 = 5.
    # Channel 1 is constant: variance 0. The mean over channels is 2.5.
    x = torch.zeros(2, 2, 1, 2)
    x[:, 0] = torch.tensor([[[1.0, 3.0]], [[5.0, 7.0]]])
    x[:, 1] = 2.0
    v = activation_variance(x)
    assert v.dtype == torch.float64 and v.item() == 2.5
    # (N, C): variance over N per channel; columns [1, 3] -> 1 and [0, 4] -> 4.
    assert activation_variance(torch.tensor([[1.0, 0.0], [3.0, 4.0]])).item() == 2.5
    # Float64 keeps what float32 loses: the mean 2^24 + 1 of a large offset with a small spread
    # is not a float32 number, and float32 gets the variance wrong.
    big = torch.tensor([2.0**24, 2.0**24 + 2]).view(2, 1)
    assert big.var(0, correction=0).item() != 1.0
    assert activation_variance(big).item() == 1.0
    with pytest.raises(ValueError):
        activation_variance(torch.ones(3))


# The Gram matrix is computed in float32 (the activations' precision): statistics to ~1e-7.


def test_identical_samples_are_fully_similar_with_stable_rank_one():
    x = torch.randn(1, 3, 4, 4).expand(5, 3, 4, 4) * torch.tensor([1.0, 2, 3, 4, 5]).view(
        5, 1, 1, 1
    )
    cosine, rank = gram_statistics(x)
    assert cosine == pytest.approx(1.0, abs=1e-6) and rank == pytest.approx(1.0, abs=1e-6)


def test_orthogonal_samples_have_no_similarity_and_full_stable_rank():
    # Rows of a scaled identity, reshaped to images: each sample its own direction.
    b = 6
    x = (torch.eye(b) * torch.arange(1.0, b + 1).view(-1, 1)).view(b, 1, 2, 3)
    cosine, rank = gram_statistics(x)
    assert cosine == pytest.approx(0.0, abs=1e-6) and rank == pytest.approx(b, abs=1e-6)


def test_gram_statistics_of_three_samples_by_hand():
    # y1 = (1, 0), y2 = (0, 1), y3 = (1, 1) / sqrt 2 (given as (3, 3): scale does not matter).
    # M = [[1, 0, s], [0, 1, s], [s, s, 1]] with s = 1/sqrt 2. Off-diagonal row sums: s, s, 2s,
    # so the average cosine similarity is (4s / 2) / 3 = 2s / 3. M's eigenvalues are those of
    # Y^T Y = [[1.5, 0.5], [0.5, 1.5]], 2 and 1 (and 0): stable rank 3 / 2.
    x = torch.tensor([[1.0, 0.0], [0.0, 1.0], [3.0, 3.0]])
    cosine, rank = gram_statistics(x)
    assert cosine == pytest.approx(2 / (3 * math.sqrt(2)), abs=1e-6)
    assert rank == pytest.approx(1.5, abs=1e-6)


def test_a_zero_sample_counts_as_dissimilar_to_every_other():
    # y1 = y3 (directions), y2 = 0: M = [[1, 0, 1], [0, 0, 0], [1, 0, 1]]; off-diagonal row sums
    # 1, 0, 1 over B - 1 = 2, mean 1/3; trace 2, largest eigenvalue 2: stable rank 1.
    x = torch.tensor([[1.0, 0.0], [0.0, 0.0], [3.0, 0.0]])
    cosine, rank = gram_statistics(x)
    assert cosine == pytest.approx(1 / 3, abs=1e-6) and rank == pytest.approx(1.0, abs=1e-6)
    assert gram_statistics(torch.zeros(3, 4)) == (0.0, 0.0)
    with pytest.raises(ValueError, match="at least 2"):
        gram_statistics(torch.ones(1, 4))


# --- the probe on tiny models -------------------------------------------------------------------


class TinyNet(nn.Module):
    """conv -> ReLU -> conv -> ReLU -> pool -> linear, with BatchNorm after the first conv; its
    two ReLUs are the blocks. ``boom`` multiplies the second block's input (inf: a blow-up)."""

    def __init__(self, boom: float = 1.0) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 4, 3, padding=1)
        self.bn = nn.BatchNorm2d(4)
        self.act1 = nn.ReLU()
        self.conv2 = nn.Conv2d(4, 5, 3, stride=2, padding=1)
        self.act2 = nn.ReLU()
        self.fc = nn.Linear(5, 3)
        self.boom = boom

    def forward(self, x):
        h = self.act1(self.bn(self.conv1(x)))
        h = self.act2(self.conv2(h * self.boom))
        return self.fc(h.mean((2, 3)))

    def probe_blocks(self):
        return [("act1", self.act1), ("act2", self.act2)]


def tiny_batches(n: int = 2, b: int = 4, classes: int = 3, size: int = 6):
    g = torch.Generator().manual_seed(1)
    return [
        (torch.randn(b, 3, size, size, generator=g), torch.randint(0, classes, (b,), generator=g))
        for _ in range(n)
    ]


def by_hand(model: TinyNet, x, y) -> dict[str, float]:
    """The probe's numbers for one batch, computed directly."""
    c1 = model.conv1(x)
    a1 = model.act1(model.bn(c1))
    c2 = model.conv2(a1)
    a2 = model.act2(c2)
    loss = F.cross_entropy(model.fc(a2.mean((2, 3))), y)
    g1, g2 = torch.autograd.grad(loss, [c1, c2])
    return {
        "var1": a1.detach().double().var(dim=(0, 2, 3), unbiased=False).mean().item(),
        "var2": a2.detach().double().var(dim=(0, 2, 3), unbiased=False).mean().item(),
        "grad1": g1.double().norm().item(),
        "grad2": g2.double().norm().item(),
    }


def test_probe_matches_a_hand_computation_with_autograd():
    torch.manual_seed(0)
    model = TinyNet()
    batches = tiny_batches()
    result = init_probe(model, batches)
    assert result.block_names == ["act1", "act2"] and result.conv_names == ["conv1", "conv2"]
    assert result.grad_at == "conv" and result.nonfinite_block is None
    hand = [by_hand(model.train(), x, y) for x, y in batches]
    model.zero_grad(set_to_none=True)

    def mean_std(key):
        a, b = (h[key] for h in hand)
        return (a + b) / 2, abs(a - b) / 2  # population std of two values

    for got, got_std, key in (
        (result.act_var[0], result.act_var_std[0], "var1"),
        (result.act_var[1], result.act_var_std[1], "var2"),
        (result.grad_norm[0], result.grad_norm_std[0], "grad1"),
        (result.grad_norm[1], result.grad_norm_std[1], "grad2"),
    ):
        mean, std = mean_std(key)
        assert got == pytest.approx(mean, rel=1e-6) and got_std == pytest.approx(std, rel=1e-5)
    x0 = batches[0][0]
    cosine, rank = gram_statistics(model.act1(model.bn(model.conv1(x0))))
    assert len(result.cosine) == 2 and 0 < result.stable_rank[0] <= 4
    # One batch: standard deviations are 0 and the means are that batch's values.
    single = init_probe(model, batches[:1])
    assert single.cosine[0] == pytest.approx(cosine, rel=1e-9)
    assert single.stable_rank[0] == pytest.approx(rank, rel=1e-9)
    assert single.act_var_std == [0.0, 0.0] and single.grad_norm_std == [0.0, 0.0]


def test_a_model_without_convolutions_has_its_gradients_taken_at_its_blocks():
    class MLP(nn.Module):
        def __init__(self):
            super().__init__()
            self.l1, self.a1, self.l2 = nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 3)

        def forward(self, x):
            return self.l2(self.a1(self.l1(x.flatten(1))))

        def probe_blocks(self):
            return [("a1", self.a1)]

    torch.manual_seed(0)
    net = MLP()
    x, y = torch.randn(5, 6), torch.tensor([0, 1, 2, 0, 1])
    result = init_probe(net, [(x, y)])
    assert result.grad_at == "block" and result.conv_names == ["a1"]
    h = net.a1(net.l1(x))
    (g,) = torch.autograd.grad(F.cross_entropy(net.l2(h), y), [h])
    assert result.grad_norm[0] == pytest.approx(g.norm().item(), rel=1e-6)
    assert result.act_var[0] == pytest.approx(h.detach().var(0, unbiased=False).mean().item())


@pytest.mark.parametrize("norm", ["batchnorm", "convnorm"])
def test_the_probe_leaves_parameters_buffers_gradients_and_mode_as_they_were(norm):
    torch.manual_seed(0)
    net = create_model("vgg", block=conv_norm_factory(norm), num_classes=10, depth=5, width=4)
    x, y = torch.randn(4, 3, 32, 32), torch.tensor([0, 1, 2, 3])
    net.eval()
    weight = next(m for m in net.modules() if isinstance(m, nn.Conv2d)).weight
    weight.grad = torch.ones_like(weight)  # a gradient the probe must leave alone
    before = {k: v.clone() for k, v in net.state_dict().items()}
    buffers = {name: b for name, b in net.named_buffers()}
    result = init_probe(net, [(x, y), (x.flip(0), y)])
    assert len(result.act_var) == 4 and len(result.grad_norm) == 4
    after = net.state_dict()
    assert before.keys() == after.keys()
    for key, value in before.items():
        # BatchNorm's running statistics, and ConvNorm's running preconditioner (empty before
        # any training step: the probe's training-mode pass must not leave one behind).
        assert torch.equal(value, after[key]), key
    for name, b in net.named_buffers():
        assert b is buffers[name], name  # the same tensors, restored in place
    assert not net.training
    assert torch.equal(weight.grad, torch.ones(4, 3, 3, 3))
    assert all(p.grad is None for p in net.parameters() if p is not weight)
    assert all(not m._forward_hooks for m in net.modules())


def test_a_failing_batch_leaves_no_hooks_and_restores_the_model():
    torch.manual_seed(0)
    net = TinyNet()
    before = {k: v.clone() for k, v in net.state_dict().items()}
    x, _ = tiny_batches(1)[0]
    with pytest.raises(IndexError):  # a label outside the classes
        init_probe(net, [(x, torch.tensor([0, 1, 2, 7]))])
    assert all(not m._forward_hooks for m in net.modules())
    assert all(torch.equal(v, net.state_dict()[k]) for k, v in before.items())
    with pytest.raises(NormbenchError, match="at least 2 samples"):
        init_probe(net, [(x[:1], torch.tensor([0]))])
    with pytest.raises(NormbenchError, match="no batches"):
        init_probe(net, [])
    with pytest.raises(NormbenchError, match="does not list its blocks"):
        init_probe(nn.Sequential(nn.Conv2d(3, 3, 1)), [(x, torch.tensor([0, 1, 2, 0]))])


def test_non_finite_activations_name_the_first_block_and_stop_the_probe():
    torch.manual_seed(0)
    net = TinyNet(boom=math.inf)
    before = {k: v.clone() for k, v in net.state_dict().items()}
    result = init_probe(net, tiny_batches())
    assert result.nonfinite_block == 1 and result.nonfinite_name == "act2"
    assert len(result.act_var) == 1 and result.grad_norm == []
    # The first batch stopped at the second block: the first block has that one batch's value.
    assert result.act_var_std == [0.0]
    rows = result.rows(7)
    assert [(r.name, r.layer) for r in rows] == [(n, 0) for n in PER_BLOCK] + [
        (M.PROBE_NONFINITE_LAYER, -1)
    ]
    assert rows[-1].value == 1.0 and all(r.step == 7 and r.split == "train" for r in rows)
    assert all(not m._forward_hooks for m in net.modules())
    assert all(torch.equal(v, net.state_dict()[k]) for k, v in before.items())


def test_rows_are_the_interfaces_rows():
    result = ProbeResult(
        ["a", "b"], ["c0", "c1", "c2"],
        act_var=[2.0, 8.0], act_var_std=[0.1, 0.2], cosine=[0.3, 0.6], cosine_std=[0.0, 0.1],
        stable_rank=[3.0, 1.5], stable_rank_std=[0.2, 0.1],
        grad_norm=[6.0, 2.0, 3.0], grad_norm_std=[1.0, 0.5, 0.1],
    )  # fmt: skip
    rows = result.rows(0)
    keyed = {(r.name, r.layer): r for r in rows}
    assert len(rows) == len(keyed) == 2 * 6 + 3 * 2 + 4
    assert all(r.step == 0 and r.split == "train" and r.corruption == "" for r in rows)
    assert keyed[M.PROBE_ACT_VAR, 1].value == 8.0 and keyed[M.PROBE_COSINE_STD, 1].value == 0.1
    assert keyed[M.PROBE_GRAD_NORM, 2].value == 3.0 and keyed[M.PROBE_GRAD_NORM_STD, 0].value == 1.0
    assert keyed[M.PROBE_ACT_GROWTH, -1].value == 4.0  # 8 / 2
    assert keyed[M.PROBE_LAST_COSINE, -1].value == 0.6
    assert keyed[M.PROBE_LAST_STABLE_RANK, -1].value == 1.5
    assert keyed[M.PROBE_GRAD_RATIO, -1].value == 2.0  # 6 / 3


def test_batchnorm_keeps_activation_growth_far_below_no_normalization():
    # Lubana et al. (2021), figure 1: without normalization a ResNet's activation variance grows
    # exponentially with depth (each residual addition adds a branch as large as its input);
    # BatchNorm branches add about one unit each, a linear growth. ResNet-20, default width and
    # initialization, at initialization: about 6x for BatchNorm, 70x or more without.
    g = torch.Generator().manual_seed(0)
    batches = [
        (torch.randn(16, 3, 32, 32, generator=g), torch.randint(0, 10, (16,), generator=g))
        for _ in range(2)
    ]
    growth, last_cosine = {}, {}
    for norm in ("batchnorm", "none"):
        torch.manual_seed(0)
        net = create_model("resnet20", block=conv_norm_factory(norm), num_classes=10)
        result = init_probe(net, batches)
        rows = {r.name: r.value for r in result.rows(0) if r.layer == -1}
        growth[norm], last_cosine[norm] = rows[M.PROBE_ACT_GROWTH], rows[M.PROBE_LAST_COSINE]
    assert growth["batchnorm"] < 20
    assert growth["none"] > 10 * growth["batchnorm"]
    # And BatchNorm keeps the samples more distinguishable at the last block.
    assert last_cosine["batchnorm"] < last_cosine["none"]


# --- probe runs on real CIFAR-10 ----------------------------------------------------------------

CPU = torch.device("cpu")


def probe_spec(norm="batchnorm", steps=(0,), model="resnet20", model_args=None, lr=0.05, **kw):
    settings = {
        "model": model,
        "model_args": {"width": 4} if model_args is None else model_args,
        "batch_size": 16,
        "batches": 2,
        "probe_steps": list(steps),
        "precision": "fp32",
        "train_subset": 64,
        "augment": {"crop_padding": 4, "flip": True},
        "model_label": f"{model}(width=4)",
    } | kw
    return RunSpec("probes", "tiny", 1, "probe", "cifar10", norm, "sgd", 0, settings, {"lr": lr})


def probe_rows(result):
    return [r for r in result.metrics if r.name != M.WALL_TIME]


def test_a_probe_at_initialization_on_real_data(cifar_dir):
    spec = probe_spec(model="vgg", model_args={"depth": 5, "width": 8})
    calls = []
    progress = Progress(on_start=lambda *a: calls.append(a), on_step=calls.append)
    result = probe_runner.run(spec, device=CPU, data_dir=cifar_dir, progress=progress)
    assert result.status == "finished" and result.epochs_done == 1
    assert calls == [(1, 2), 1, 2]  # two probe batches, no training
    keys = [(r.name, r.layer, r.step) for r in result.metrics]
    expected = [(n, i, 0) for i in range(4) for n in PER_BLOCK]
    expected += [(n, i, 0) for i in range(4) for n in PER_CONV]
    expected += [(n, -1, 0) for n in SUMMARIES] + [(M.PARAM_COUNT, -1, -1), (M.WALL_TIME, -1, -1)]
    assert keys == expected
    assert all(r.split == "train" for r in result.metrics if r.step == 0)
    assert all(math.isfinite(r.value) for r in result.metrics)
    info = result.info
    assert info["blocks"] == ["features.0", "features.2", "features.4", "features.6"]
    assert info["convs"] == ["features.0.conv", "features.2.conv", "features.4.conv",
                             "features.6.conv"]  # fmt: skip
    assert info["precision"] == "fp32" and info["probe_examples"] == 32
    assert info["data_source"] and info["norm_source_sha256"]
    # The rows are the probe of the model the seed builds, on the batches the seed draws.
    train = probe_runner.load_dataset("cifar10", "train", cifar_dir).subset(64, seed=0)
    batches = probe_runner.probe_batches(train, spec, CPU)
    assert [len(x) for x, _ in batches] == [16, 16]
    torch.manual_seed(0)
    net = create_model(
        "vgg", block=conv_norm_factory("batchnorm"), num_classes=10, depth=5, width=8
    )
    again = init_probe(net.to(memory_format=torch.channels_last), batches).rows(0)
    assert again == probe_rows(result)[: len(again)]


def test_probing_after_training_is_deterministic_and_resumes_to_the_same_rows(cifar_dir, tmp_path):
    # 64 images in batches of 16: four steps an epoch, so step 6 is in the second epoch.
    spec = probe_spec(steps=(0, 3, 6))
    calls = []
    progress = Progress(on_start=lambda *a: calls.append(a), on_step=calls.append)
    first = probe_runner.run(spec, device=CPU, data_dir=cifar_dir, progress=progress)
    assert first.status == "finished" and first.epochs_done == 3
    assert calls == [(1, 3 * 2 + 6), *range(1, 13)]
    rows = probe_rows(first)
    per_step = {s: [r for r in rows if r.step == s] for s in (0, 3, 6)}
    assert len(per_step[0]) == len(per_step[3]) == len(per_step[6]) == 10 * 6 + 19 * 2 + 4
    # Training changed the model between the probes.
    var = {s: [r.value for r in per_step[s] if r.name == M.PROBE_ACT_VAR] for s in per_step}
    assert var[0] != var[3] != var[6]

    assert probe_rows(probe_runner.run(spec, device=CPU, data_dir=cifar_dir)) == rows

    class Stop(Exception):
        pass

    def stop_at(unit):
        def on_step(k):
            if k == unit:
                raise Stop

        return Progress(on_step=on_step)

    checkpoint = tmp_path / "probe.pt"
    # Killed while training towards step 6 (after the probe at step 3 was saved): 2 + 3 + 2 = 7
    # units done, then one more training step.
    with pytest.raises(Stop):
        probe_runner.run(
            spec, device=CPU, data_dir=cifar_dir, checkpoint=checkpoint, progress=stop_at(8)
        )
    assert torch.load(checkpoint, weights_only=True)["probes_done"] == 2
    resumed = probe_runner.run(spec, device=CPU, data_dir=cifar_dir, checkpoint=checkpoint)
    assert resumed.status == "finished" and resumed.epochs_done == 3
    assert resumed.info["resumed_from_probe_step"] == 6
    assert probe_rows(resumed) == rows
    # A checkpoint of another run is not used.
    other = probe_spec(steps=(0, 3, 6), lr=0.01)
    assert (
        "resumed_from_probe_step"
        not in probe_runner.run(other, device=CPU, data_dir=cifar_dir, checkpoint=checkpoint).info
    )


class InfFromStage2(nn.Module):
    """A norm whose second-stage instances (8 channels in a width-4 ResNet) output inf."""

    def __init__(self, num_channels: int, **kwargs) -> None:
        super().__init__()
        self.num_channels = num_channels

    def forward(self, x):
        return x * math.inf if self.num_channels == 8 else x


def test_non_finite_activations_end_the_run_as_diverged(cifar_dir, monkeypatch):
    monkeypatch.setattr(
        probe_runner, "conv_norm_factory", lambda norm: conv_norm_factory(InfFromStage2)
    )
    result = probe_runner.run(probe_spec(norm="none"), device=CPU, data_dir=cifar_dir)
    # ResNet-20 width 4: the stem and three blocks at 4 channels, then layers.3, the first with 8.
    assert result.status == "diverged" and result.diverged_step == 0
    assert result.reason == "non-finite activations at block 4 (layers.3) at step 0"
    assert result.epochs_done == 0
    keys = [(r.name, r.layer, r.step) for r in result.metrics]
    assert keys == [(n, i, 0) for i in range(4) for n in PER_BLOCK] + [
        (M.PROBE_NONFINITE_LAYER, -1, 0), (M.PARAM_COUNT, -1, -1), (M.WALL_TIME, -1, -1),
    ]  # fmt: skip
    assert result.metrics[24].value == 4.0


def test_a_non_finite_training_loss_ends_the_run_with_the_earlier_rows(cifar_dir):
    result = probe_runner.run(
        probe_spec(norm="none", steps=(0, 5), lr=1e12), device=CPU, data_dir=cifar_dir
    )
    assert result.status == "diverged" and result.epochs_done == 1
    assert 0 < result.diverged_step < 5
    assert result.reason.startswith("non-finite training loss")
    assert result.reason.endswith(f"at step {result.diverged_step}")
    assert {r.step for r in result.metrics} == {0, -1}


@pytest.mark.parametrize(
    ("change", "message"),
    [({"batch_size": 1}, "at least 2 samples"), ({"probe_steps": [3, 0]}, "ascending"),
     ({"probe_steps": []}, "ascending"), ({"probe_steps": [0, 0]}, "distinct"),
     ({"probe_steps": 3}, "ascending"), ({"batches": 0}, "batches"),
     ({"precision": "bf16"}, "fp32"), ({"batches": 5}, "needs 5 x 16 = 80 training images")],
)  # fmt: skip
def test_bad_probe_settings_are_refused(cifar_dir, change, message):
    with pytest.raises(NormbenchError, match=message):
        probe_runner.run(probe_spec(**change), device=CPU, data_dir=cifar_dir)


def test_estimate_counts_probe_batches_and_training_steps():
    at_init = probe_runner.estimate_seconds(probe_spec(), CPU, (3, 32, 32), 10)
    trained = probe_runner.estimate_seconds(probe_spec(steps=(0, 4)), CPU, (3, 32, 32), 10)
    assert 0 < at_init < math.inf and 0 < trained < math.inf
