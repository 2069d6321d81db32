"""Landscape and ICS probes (Santurkar et al. 2018) against hand computations, their exact
restore of the model and the random stream, noisy BatchNorm's draws, and the probes inside real
classify runs."""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from normbench import metrics as M
from normbench.errors import NormbenchError
from normbench.landscape import ics_probe, landscape_probe, weight_layers
from normbench.norms import create_norm
from normbench.suites import load_suite, plan
from runners import classify

pytestmark = pytest.mark.usefixtures("one_thread")


class Quadratic(nn.Module):
    """L(w) = 0.5 w^T A w + c^T w with c drawn from the global random stream at every forward
    (a stochastic loss), and a buffer counting the forwards (a running statistic)."""

    def __init__(self, a: torch.Tensor, w: torch.Tensor, noise: float = 0.0) -> None:
        super().__init__()
        self.w = nn.Parameter(w.clone())
        self.register_buffer("a", a)
        self.register_buffer("forwards", torch.zeros((), dtype=torch.long))
        self.noise = noise

    def forward(self) -> torch.Tensor:
        self.forwards += 1
        c = self.noise * torch.randn(len(self.w), dtype=self.w.dtype)
        return 0.5 * self.w @ self.a @ self.w + c @ self.w


def spd(n: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    m = torch.randn(n, n, generator=g, dtype=torch.float64)
    return m @ m.T + 0.5 * torch.eye(n, dtype=torch.float64)


@pytest.mark.parametrize("noise", [0.0, 1.0])
def test_landscape_of_a_quadratic_matches_its_closed_form(noise):
    a = spd(6)
    w0 = torch.linspace(-1, 2, 6, dtype=torch.float64)
    model = Quadratic(a, w0, noise)
    etas = [0.01, 0.05, 0.1]
    torch.manual_seed(3)
    c = noise * torch.randn(6, dtype=torch.float64)  # the draw the probe's passes see
    torch.manual_seed(3)
    result = landscape_probe(model, model, etas)

    g = a @ w0 + c
    loss = lambda w: float(0.5 * w @ a @ w + c @ w)  # noqa: E731
    # With the same draw at every point, grad L(w - eta g) - g = -eta A g exactly.
    expected_changes = [eta * float(torch.linalg.norm(a @ g)) for eta in etas]
    expected_losses = [loss(w0 - eta * g) for eta in etas]
    assert result.loss == pytest.approx(loss(w0), rel=1e-12)
    assert result.grad_norm == pytest.approx(float(torch.linalg.norm(g)), rel=1e-12)
    assert result.losses == pytest.approx(expected_losses, rel=1e-12)
    assert result.grad_changes == pytest.approx(expected_changes, rel=1e-10)
    assert result.loss_min == pytest.approx(min(expected_losses), rel=1e-12)
    assert result.loss_max == pytest.approx(max(expected_losses), rel=1e-12)
    assert result.grad_change_min == pytest.approx(expected_changes[0], rel=1e-10)
    assert result.grad_change_max == pytest.approx(expected_changes[-1], rel=1e-10)
    # Along g the gradient changes by ||A g|| per unit of distance: beta = ||A g|| / ||g||.
    beta = float(torch.linalg.norm(a @ g) / torch.linalg.norm(g))
    assert result.beta == pytest.approx(beta, rel=1e-10)
    # The range runs over the grid's points, not L(w): a small step lowers the loss.
    assert result.loss_max < result.loss


def test_beta_is_the_largest_ratio_over_the_grid():
    # L = sum(w^4)/4 is not quadratic: the gradient change per distance depends on the step.
    class Quartic(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.w = nn.Parameter(torch.tensor([1.0, -2.0], dtype=torch.float64))

        def forward(self) -> torch.Tensor:
            return self.w.pow(4).sum() / 4

    model = Quartic()
    etas = [0.01, 0.001, 0.02]  # the largest ratio is neither the first nor the last
    result = landscape_probe(model, model, etas)
    w = torch.tensor([1.0, -2.0], dtype=torch.float64)
    g = w**3
    ratios = [
        float(torch.linalg.norm((w - e * g) ** 3 - g) / (e * torch.linalg.norm(g))) for e in etas
    ]
    assert result.beta == pytest.approx(max(ratios), rel=1e-10)
    assert max(ratios) == ratios[1] and max(ratios) > 1.01 * min(ratios)  # the grid matters


def two_layer_net(seed: int = 0) -> nn.Sequential:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(4, 5, bias=False), nn.Linear(5, 3, bias=False)).double()


def test_ics_of_a_two_layer_linear_net_matches_a_hand_computation():
    net = two_layer_net()
    g = torch.Generator().manual_seed(1)
    x = torch.randn(8, 4, generator=g, dtype=torch.float64)
    y = torch.randn(8, 3, generator=g, dtype=torch.float64)
    lr = 0.3

    def loss_fn() -> torch.Tensor:
        return 0.5 * (net(x) - y).pow(2).sum()

    result = ics_probe(net, loss_fn, lr=lr)

    # By hand: L = 0.5 ||x W1^T W2^T - y||^2; dL/dW2 = R^T (x W1^T), dL/dW1 = W2^T R^T x.
    w1, w2 = net[0].weight.detach(), net[1].weight.detach()
    r = x @ w1.T @ w2.T - y
    g1, g2 = w2.T @ r.T @ x, r.T @ (x @ w1.T)
    w1_new = w1 - lr * g1
    g2_prime = (x @ w1_new.T @ w2.T - y).T @ (x @ w1_new.T)
    assert result.layers == ("0", "1")
    # The first layer has no earlier layer: G' = G.
    assert result.l2[0] == pytest.approx(0.0, abs=1e-12)
    assert result.cosine[0] == pytest.approx(1.0, rel=1e-12)
    assert result.l2[1] == pytest.approx(float(torch.linalg.norm(g2 - g2_prime)), rel=1e-10)
    cos = float((g2 * g2_prime).sum() / (torch.linalg.norm(g2) * torch.linalg.norm(g2_prime)))
    assert result.cosine[1] == pytest.approx(cos, rel=1e-10)
    assert result.l2[1] > 1e-3  # a real shift, not a vacuous zero
    assert result.loss == pytest.approx(float(0.5 * r.pow(2).sum()), rel=1e-12)


def test_ics_layers_follow_the_forward_order_not_the_module_order():
    class Backwards(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.late = nn.Linear(5, 2)
            self.early = nn.Linear(3, 5)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.late(torch.tanh(self.early(x)))

    torch.manual_seed(0)
    net = Backwards()
    x = torch.randn(4, 3)
    result = ics_probe(net, lambda: net(x).square().mean(), lr=0.1)
    assert result.layers == ("early", "late")
    assert [type(m).__name__ for m in weight_layers(net)] == ["Linear", "Linear"]


class SmallNet(nn.Module):
    """conv - norm - ReLU twice, dropout and a linear head: every kind of state a probe touches
    (running statistics, a noise draw, a dropout mask)."""

    def __init__(self, norm: str) -> None:
        super().__init__()
        self.conv1, self.norm1 = nn.Conv2d(3, 4, 3, padding=1), create_norm(norm, 4)
        self.conv2, self.norm2 = nn.Conv2d(4, 4, 3, padding=1), create_norm(norm, 4)
        self.drop = nn.Dropout(0.3)
        self.head = nn.Linear(4, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.norm1(self.conv1(x)))
        x = F.relu(self.norm2(self.conv2(x)))
        return self.head(self.drop(x.mean((2, 3))))


def batch(seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(6, 3, 8, 8, generator=g), torch.randint(0, 3, (6,), generator=g)


@pytest.mark.parametrize("norm", ["batchnorm", "noisy_batchnorm"])
def test_probes_leave_the_model_and_the_random_stream_exactly_as_they_found_them(norm):
    torch.manual_seed(0)
    net = SmallNet(norm).train()
    x, y = batch()
    F.cross_entropy(net(x), y).backward()  # gradients, moved running statistics, a draw
    state = {k: v.clone() for k, v in net.state_dict().items() if torch.is_tensor(v)}
    extra = {k: v for k, v in net.state_dict().items() if not torch.is_tensor(v)}
    grads = {n: p.grad.clone() for n, p in net.named_parameters()}
    rng = torch.get_rng_state()

    def loss_fn() -> torch.Tensor:
        return F.cross_entropy(net(x), y)

    landscape_probe(net, loss_fn, [0.1, 0.5])
    ics_probe(net, loss_fn, lr=0.5)

    after = net.state_dict()
    for key, value in state.items():
        assert torch.equal(after[key], value), key
    for key, value in extra.items():
        assert after[key] == value, key
    if norm == "noisy_batchnorm":
        assert extra and net.norm1.noise_draw == 1
    for name, p in net.named_parameters():
        assert torch.equal(p.grad, grads[name]), name
    assert torch.equal(torch.get_rng_state(), rng)


def test_a_probe_does_not_change_training():
    def train(probe: bool) -> dict[str, torch.Tensor]:
        torch.manual_seed(0)
        net = SmallNet("noisy_batchnorm").train()
        opt = torch.optim.SGD(net.parameters(), lr=0.1, momentum=0.9)
        for step in range(4):
            x, y = batch(step)
            if probe:
                loss_fn = lambda x=x, y=y: F.cross_entropy(net(x), y)  # noqa: E731
                landscape_probe(net, loss_fn, [0.1])
                ics_probe(net, loss_fn, lr=0.1)
            opt.zero_grad()
            F.cross_entropy(net(x), y).backward()
            opt.step()
        return net.state_dict()

    plain, probed = train(False), train(True)
    assert plain.keys() == probed.keys()
    for key, value in plain.items():
        assert torch.equal(value, probed[key]) if torch.is_tensor(value) else value == probed[key]


def test_every_landscape_point_sees_the_draws_of_the_point_at_w():
    # Noisy BatchNorm and dropout draw at every pass; with lr -> the same draws, an infinitely
    # small step changes the gradient infinitely little. A fresh draw per point would not.
    torch.manual_seed(0)
    net = SmallNet("noisy_batchnorm").train()
    x, y = batch()
    result = landscape_probe(net, lambda: F.cross_entropy(net(x), y), [1e-9])
    assert result.grad_changes[0] < 1e-6 * result.grad_norm


def test_ics_g_prime_sees_the_noise_draw_of_the_next_step():
    torch.manual_seed(0)
    net = SmallNet("noisy_batchnorm").train()
    net.drop.p = 0.0  # only the noise is random
    x, y = batch()

    def loss_fn() -> torch.Tensor:
        return F.cross_entropy(net(x), y)

    # With lr 0 nothing moves: G' differs from G by the next draw of the noise alone.
    result = ics_probe(net, loss_fn, lr=0.0)
    layers = [net.conv1, net.conv2, net.head]
    assert result.layers == ("conv1", "conv2", "head")
    this_step = torch.autograd.grad(loss_fn(), [m.weight for m in layers])  # draw 0
    next_step = torch.autograd.grad(loss_fn(), [m.weight for m in layers])  # draw 1
    for i in range(3):
        assert result.l2[i] == pytest.approx(float((this_step[i] - next_step[i]).norm()), rel=1e-5)
        assert result.l2[i] > 0
    # BatchNorm without noise: no shift at all when nothing moves.
    torch.manual_seed(0)
    plain = SmallNet("batchnorm").train()
    plain.drop.p = 0.0
    still = ics_probe(plain, lambda: F.cross_entropy(plain(x), y), lr=0.0)
    assert max(still.l2) < 1e-6 and min(still.cosine) > 1 - 1e-9


def test_noisy_batchnorm_noise_has_the_drawn_per_channel_distribution():
    torch.manual_seed(0)
    norm = create_norm("noisy_batchnorm(mean_range=2.0,std_range=0.5)", 3).train()
    x = torch.randn(64, 3, 16, 16)
    clean = F.batch_norm(x, None, None, norm.weight, norm.bias, True)
    noise = (norm(x) - clean).detach()
    mean, std = noise.mean((0, 2, 3)), noise.std((0, 2, 3))
    assert mean.abs().max() <= 2.0 and not torch.allclose(mean, torch.zeros(3), atol=0.05)
    assert (std > 0.97).all() and (std < 1.53).all()
    expected = norm.noise(x.shape, x.device)
    assert torch.allclose(noise, expected, atol=1e-5)
    # The same draw until a backward pass reaches the layer, then a new one.
    assert torch.equal(norm(x), norm(x))
    norm(x).sum().backward()
    assert norm.noise_draw == 1
    assert not torch.allclose(norm(x), clean + expected, atol=1e-3)
    # No noise in eval mode: it is BatchNorm.
    norm.eval()
    reference = F.batch_norm(x, norm.running_mean, norm.running_var, norm.weight, norm.bias)
    assert torch.allclose(norm(x), reference, atol=1e-6)


def test_noisy_batchnorm_starts_from_batchnorms_weights_and_resumes_its_draws():
    from normbench.models import conv_norm_factory, create_model

    nets = {}
    for norm in ("batchnorm", "noisy_batchnorm"):
        torch.manual_seed(0)
        nets[norm] = create_model("fastnet", block=conv_norm_factory(norm), num_classes=10,
                                  widths=[4, 4, 4, 4])  # fmt: skip
    plain, noisy = (dict(nets[n].named_parameters()) for n in ("batchnorm", "noisy_batchnorm"))
    assert all(torch.equal(plain[k], noisy[k]) for k in plain)
    seeds = {m.noise_seed for m in nets["noisy_batchnorm"].modules() if hasattr(m, "noise_seed")}
    assert len(seeds) == 7  # one per layer
    torch.manual_seed(1)
    fresh = create_norm("noisy_batchnorm", 4)
    original = create_norm("noisy_batchnorm", 4)
    original.noise_draw = 5
    fresh.load_state_dict(original.state_dict())
    assert (fresh.noise_seed, fresh.noise_draw) == (original.noise_seed, 5)
    x = torch.randn(2, 4, 3, 3)
    assert torch.equal(fresh.train()(x), original.train()(x))


@pytest.mark.parametrize(
    ("call", "message"),
    [
        (lambda m, f: landscape_probe(m, f, []), "at least one step size"),
        (lambda m, f: landscape_probe(m, f, [0.1, -0.2]), "finite and > 0"),
        (lambda m, f: landscape_probe(m, f, [math.nan]), "finite and > 0"),
        (lambda m, f: landscape_probe(m, f, ["0.1"]), "are numbers"),
        (lambda m, f: ics_probe(m, f, lr=-1.0), "finite and >= 0"),
        (lambda m, f: ics_probe(m, f, [nn.ReLU()], lr=0.1), "trainable weight"),
        (lambda m, f: ics_probe(m, f, [m[0], m[0]], lr=0.1), "twice"),
        (lambda m, f: landscape_probe(m, lambda: torch.ones(2, requires_grad=True), [1]),
         "scalar loss"),
    ],
)  # fmt: skip
def test_bad_input_is_refused_with_the_reason(call, message):
    net = two_layer_net()
    x = torch.randn(2, 4, dtype=torch.float64)
    before = {k: v.clone() for k, v in net.state_dict().items()}
    with pytest.raises(NormbenchError, match=message):
        call(net, lambda: net(x).sum())
    assert all(torch.equal(v, net.state_dict()[k]) for k, v in before.items())
    frozen = nn.Linear(2, 2).requires_grad_(False)
    with pytest.raises(NormbenchError, match="no trainable parameters"):
        landscape_probe(frozen, lambda: frozen(torch.ones(2)).sum(), [0.1])


# --- probes in real classify runs -----------------------------------------------------------------

LANDSCAPE_NAMES = (
    M.LANDSCAPE_LOSS_MIN, M.LANDSCAPE_LOSS_MAX, M.LANDSCAPE_GRAD_CHANGE_MIN,
    M.LANDSCAPE_GRAD_CHANGE_MAX, M.LANDSCAPE_BETA,
)  # fmt: skip
SUMMARIES = (
    M.LANDSCAPE_LOSS_RANGE_MEAN, M.LANDSCAPE_GRAD_PRED_MEAN, M.LANDSCAPE_BETA_MEAN,
    M.ICS_L2_MEAN, M.ICS_COSINE_MEAN,
)  # fmt: skip
PROBE_NAMES = {*LANDSCAPE_NAMES, M.ICS_L2, M.ICS_COSINE, *SUMMARIES}


def smoke_spec(norm: str = "noisy_batchnorm", **settings):
    """The landscape suite's smoke run (a 5-layer VGG of width 8, 16 steps of 64 images, probes
    every 5 steps) with ``settings`` changed."""
    spec = plan(load_suite("landscape"), "smoke", norms=[norm], optimizers=["sgd"])[0]
    return dataclasses.replace(spec, settings={**spec.settings, **settings})


def probe_rows(result) -> dict[tuple[str, int, int], float]:
    return {(r.name, r.layer, r.step): r.value for r in result.metrics if r.name in PROBE_NAMES}


def test_a_run_with_the_landscape_option_probes_on_schedule_and_trains_as_without(cifar_dir):
    cpu = torch.device("cpu")
    spec = smoke_spec()
    result = classify.run(spec, device=cpu, data_dir=cifar_dir)
    assert result.status == "finished"
    rows = probe_rows(result)
    steps = [0, 5, 10, 15]  # 16 steps, every 5, each before that step's update
    for name in LANDSCAPE_NAMES:
        assert sorted(s for n, layer, s in rows if n == name and layer == -1) == steps, name
    for name in (M.ICS_L2, M.ICS_COSINE):  # the VGG's 4 convolutions and its classifier
        assert sorted((s, layer) for n, layer, s in rows if n == name) == [
            (s, layer) for s in steps for layer in range(5)
        ]
    for name in SUMMARIES:
        assert (name, -1, -1) in rows, name
    assert all(math.isfinite(v) for v in rows.values())
    assert all(r.split == "train" for r in result.metrics if r.name in PROBE_NAMES)
    for s in steps:
        assert rows[M.LANDSCAPE_LOSS_MIN, -1, s] <= rows[M.LANDSCAPE_LOSS_MAX, -1, s]
        assert rows[M.LANDSCAPE_BETA, -1, s] > 0
    assert all(-1 <= v <= 1 for (n, _, _), v in rows.items() if n == M.ICS_COSINE)
    loss_range = [
        rows[M.LANDSCAPE_LOSS_MAX, -1, s] - rows[M.LANDSCAPE_LOSS_MIN, -1, s] for s in steps
    ]
    assert rows[M.LANDSCAPE_LOSS_RANGE_MEAN, -1, -1] == pytest.approx(sum(loss_range) / 4)
    info = result.info["landscape"]
    assert info["probes"] == 4 and info["seconds"] > 0 and info["nonfinite_values"] == 0
    assert (info["every"], info["step_sizes"], info["ics"]) == (5, [0.05, 0.2, 0.4], True)

    # Off: the rows of a run without probes, and the same training to the last bit.
    off = classify.run(smoke_spec(landscape=None), device=cpu, data_dir=cifar_dir)
    assert not probe_rows(off) and "landscape" not in off.info
    kept = {(r.name, r.split, r.layer, r.step) for r in result.metrics if r.name not in PROBE_NAMES}
    assert kept == {(r.name, r.split, r.layer, r.step) for r in off.metrics}
    assert off.curves == result.curves
    values = {r.name: r.value for r in result.metrics if r.name in (M.ACCURACY, M.LOSS, M.ECE)}
    assert values == {r.name: r.value for r in off.metrics if r.name in values}


class Stop(Exception):
    pass


def test_a_resumed_run_keeps_every_probe_row(cifar_dir, tmp_path):
    cpu = torch.device("cpu")
    # Two epochs of 8 steps, a probe every 3 steps: steps 0, 3, 6 | 9, 12, 15.
    spec = smoke_spec(epochs=2, train_subset=512, landscape={"every": 3, "step_sizes": [0.1],
                                                             "ics": True})  # fmt: skip
    straight = classify.run(spec, device=cpu, data_dir=cifar_dir)

    def stop_after_first(epoch, values):
        if epoch == 1:
            raise Stop

    ckpt = tmp_path / "ckpt" / "state.pt"
    with pytest.raises(Stop):
        classify.run(spec, device=cpu, data_dir=cifar_dir, checkpoint=ckpt,
                     progress=classify.Progress(on_epoch=stop_after_first))  # fmt: skip
    resumed = classify.run(spec, device=cpu, data_dir=cifar_dir, checkpoint=ckpt)
    assert resumed.info["resumed_from_epoch"] == 1
    rows, again = probe_rows(straight), probe_rows(resumed)
    assert sorted({s for _, _, s in rows if s >= 0}) == [0, 3, 6, 9, 12, 15]
    assert again.keys() == rows.keys()
    for key, value in rows.items():
        assert again[key] == pytest.approx(value, rel=1e-5, abs=1e-7), key
    assert resumed.info["landscape"]["probes"] == straight.info["landscape"]["probes"] == 6


def test_non_finite_probe_values_are_left_out_and_counted():
    values = [
        (M.LANDSCAPE_LOSS_MIN, 1.0, -1, 0), (M.LANDSCAPE_LOSS_MAX, 3.0, -1, 0),
        (M.LANDSCAPE_LOSS_MIN, math.nan, -1, 5), (M.LANDSCAPE_LOSS_MAX, math.inf, -1, 5),
        (M.LANDSCAPE_BETA, 2.0, -1, 0), (M.LANDSCAPE_BETA, 4.0, -1, 5),
        (M.ICS_L2, 0.5, 0, 0), (M.ICS_L2, 1.5, 1, 0),
    ]  # fmt: skip
    rows, left_out = classify.landscape_rows(values)
    assert left_out == 2
    by_key = {(r.name, r.layer, r.step): r.value for r in rows}
    assert (M.LANDSCAPE_LOSS_MIN, -1, 5) not in by_key
    assert by_key[M.LANDSCAPE_LOSS_RANGE_MEAN, -1, -1] == 2.0  # step 0 only
    assert by_key[M.LANDSCAPE_BETA_MEAN, -1, -1] == 3.0
    assert by_key[M.ICS_L2_MEAN, -1, -1] == 1.0
    assert (M.ICS_COSINE_MEAN, -1, -1) not in by_key  # nothing to average
    assert all(math.isfinite(r.value) for r in rows)
