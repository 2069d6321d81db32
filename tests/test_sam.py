"""The sharpness-aware optimizers: exact steps on tiny models, the parameters each one perturbs,
running statistics in the second pass, divergence, checkpoints and the suite checks of their
hyper-parameters."""

from __future__ import annotations

import copy
import dataclasses

import pytest
import torch
import torch.nn.functional as F
from helpers import invoke, leaderboard_json, smoke_run, tiny_suite
from sqlalchemy import select
from torch import nn

from normbench.errors import NormbenchError, SuiteError
from normbench.models import conv_norm_factory, create_model
from normbench.norms import affine_parameters
from normbench.optim import (
    NORM_EPS,
    OPTIMIZERS,
    TWO_PASS,
    NonFiniteStep,
    SharpnessAware,
    create_optimizer,
    training_step,
)
from normbench.store import Run, open_store
from normbench.suites import load_suite, load_suite_file, plan
from runners import classify

SAM_FAMILY = ("sam", "asam", "sam_on", "asam_on", "sam_no_norm")


def tiny_net(norm: str = "batchnorm", seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return create_model(
        "fastnet", block=conv_norm_factory(norm), num_classes=10, widths=(8, 8, 8, 8)
    )


def batch(seed: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(16, 3, 32, 32, generator=g), torch.randint(0, 10, (16,), generator=g)


def forward_of(model: nn.Module, x: torch.Tensor, y: torch.Tensor):
    def forward():
        out = model(x)
        return out, F.cross_entropy(out, y)

    return forward


def snapshot(model: nn.Module) -> list[torch.Tensor]:
    return [p.detach().clone() for p in model.parameters()]


def test_the_family_is_registered_as_two_pass_wrappers():
    for name in SAM_FAMILY:
        assert OPTIMIZERS.info(name).has(TWO_PASS)
        assert isinstance(create_optimizer(name, tiny_net(), lr=0.1), SharpnessAware)
    assert not OPTIMIZERS.info("sgd").has(TWO_PASS)


@pytest.mark.parametrize("base", ["sgd", "adamw"])
def test_sam_with_rho_zero_takes_exactly_the_base_step(base):
    plain, wrapped = tiny_net(), tiny_net()
    x, y = batch()
    base_opt = create_optimizer(base, plain, lr=0.05)
    sam = create_optimizer("sam", wrapped, lr=0.05, base=base)
    sam.rho = 0.0  # suites refuse rho = 0; the wrapper itself takes it
    for _ in range(2):  # a second step also uses the momentum / moment state
        training_step(base_opt, forward_of(plain, x, y))
        training_step(sam, forward_of(wrapped, x, y))
    for a, b in zip(plain.parameters(), wrapped.parameters(), strict=True):
        assert torch.equal(a, b)


def test_sam_on_perturbs_exactly_the_norm_affine_parameters_and_restores_all():
    model = tiny_net()
    x, y = batch()
    opt = create_optimizer("sam_on", model, lr=0.1, rho=0.5)
    norm_ids = {id(p) for p in affine_parameters(model)}
    assert norm_ids and len(norm_ids) < len(list(model.parameters()))
    before = snapshot(model)
    seen = {}

    def forward():
        if "at_perturbed" not in seen and torch.is_grad_enabled() and "first" in seen:
            seen["at_perturbed"] = snapshot(model)
        seen["first"] = True
        return forward_of(model, x, y)()

    restored_before_base_step = {}
    base_step = opt.base.step

    def checked_step(*args, **kwargs):
        restored_before_base_step["params"] = snapshot(model)
        return base_step(*args, **kwargs)

    opt.base.step = checked_step
    training_step(opt, forward)

    perturbed = seen["at_perturbed"]
    for p, old, mid in zip(model.parameters(), before, perturbed, strict=True):
        if id(p) in norm_ids:
            assert not torch.equal(old, mid)  # every norm scale and shift moved
        else:
            assert torch.equal(old, mid)  # bitwise unchanged
    for old, now in zip(before, restored_before_base_step["params"], strict=True):
        assert torch.equal(old, now)  # the base step starts from the original weights


def test_sam_no_norm_perturbs_everything_but_the_norms():
    model = tiny_net()
    opt = create_optimizer("sam_no_norm", model, lr=0.1)
    norm_ids = {id(p) for p in affine_parameters(model)}
    assert {id(p) for p in opt.perturbed} == {id(p) for p in model.parameters()} - norm_ids
    assert {id(p) for p in create_optimizer("sam", model, lr=0.1).perturbed} == {
        id(p) for p in model.parameters()
    }


def test_sam_on_ascent_has_norm_rho_over_the_perturbed_subset_only():
    model = tiny_net()
    x, y = batch()
    opt = create_optimizer("sam_on", model, lr=0.1, rho=0.3)
    _, loss = forward_of(model, x, y)()
    loss.backward()
    e = opt.perturbation()
    grads = [p.grad for p in opt.perturbed]
    subset_norm = torch.linalg.vector_norm(torch.cat([g.flatten() for g in grads]))
    all_norm = torch.linalg.vector_norm(torch.cat([p.grad.flatten() for p in model.parameters()]))
    assert all_norm > 1.5 * subset_norm  # the two choices differ measurably here
    for ei, g in zip(e, grads, strict=True):
        torch.testing.assert_close(ei, 0.3 * g / (subset_norm + NORM_EPS))
    norm_e = torch.linalg.vector_norm(torch.cat([ei.flatten() for ei in e]))
    assert norm_e.item() == pytest.approx(0.3, rel=1e-5)


def test_asam_perturbation_matches_a_hand_computation():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 2), nn.ReLU(), nn.Linear(2, 1))
    x = torch.randn(5, 3)
    opt = SharpnessAware(
        torch.optim.SGD(model.parameters(), lr=0.1),
        model,
        list(model.parameters()),
        rho=0.7,
        adaptive=True,
        eta=0.01,
    )
    model(x).pow(2).mean().backward()
    w1, b1, w2, b2 = model.parameters()
    # T = |w| + eta for weights; biases keep T = 1 (ASAM without normalize_bias).
    t = [w1.abs() + 0.01, torch.ones_like(b1), w2.abs() + 0.01, torch.ones_like(b2)]
    tg = [ti * p.grad for ti, p in zip(t, (w1, b1, w2, b2), strict=True)]
    norm = torch.sqrt(sum((v**2).sum() for v in tg))
    expected = [0.7 * ti * v / (norm + NORM_EPS) for ti, v in zip(t, tg, strict=True)]
    for got, want in zip(opt.perturbation(), expected, strict=True):
        torch.testing.assert_close(got, want)
    # normalize_bias scales the biases by |b| + eta too.
    opt2 = SharpnessAware(
        opt.base, model, list(model.parameters()), rho=0.7, adaptive=True, eta=0.01,
        normalize_bias=True,
    )  # fmt: skip
    t2 = [p.abs() + 0.01 for p in (w1, b1, w2, b2)]
    tg2 = [ti * p.grad for ti, p in zip(t2, (w1, b1, w2, b2), strict=True)]
    norm2 = torch.sqrt(sum((v**2).sum() for v in tg2))
    for got, ti, v in zip(opt2.perturbation(), t2, tg2, strict=True):
        torch.testing.assert_close(got, 0.7 * ti * v / (norm2 + NORM_EPS))


def test_second_pass_statistics_update_or_freeze():
    x, y = batch()
    results = {}
    for mode in ("update", "freeze"):
        model = tiny_net()
        opt = create_optimizer("sam", model, lr=0.1, second_pass_stats=mode)
        training_step(opt, forward_of(model, x, y))
        results[mode] = {k: v.clone() for k, v in model.state_dict().items() if "running" in k}
    # One plain forward in training mode is what the frozen second pass leaves behind.
    reference = tiny_net()
    with torch.no_grad():
        reference(x)
    once = {k: v for k, v in reference.state_dict().items() if "running" in k}
    assert once
    for k, v in once.items():
        assert torch.equal(results["freeze"][k], v)
    assert any(not torch.equal(results["update"][k], v) for k, v in once.items())


def test_a_non_finite_perturbation_raises_and_leaves_the_parameters():
    model = tiny_net()
    opt = create_optimizer("sam", model, lr=0.1)
    x, y = batch()
    before = snapshot(model)

    def forward():
        out, loss = forward_of(model, x, y)()
        return out, loss * float("inf")

    with pytest.raises(NonFiniteStep, match="non-finite training loss"):
        training_step(opt, forward)
    model.zero_grad()
    _, loss = forward_of(model, x, y)()
    loss.backward()
    next(iter(opt.perturbed)).grad[0] = float("nan")
    with pytest.raises(NonFiniteStep, match="perturbation"):
        opt.step(lambda: forward_of(model, x, y)()[1])
    for old, p in zip(before, model.parameters(), strict=True):
        assert torch.equal(old, p)


def test_state_dict_round_trip_continues_identically():
    x, y = batch()
    a = tiny_net()
    opt_a = create_optimizer("sam_on", a, lr=0.1)
    training_step(opt_a, forward_of(a, x, y))
    b = copy.deepcopy(a)
    opt_b = create_optimizer("sam_on", b, lr=0.1)
    opt_b.load_state_dict(copy.deepcopy(opt_a.state_dict()))  # as a checkpoint file holds it
    training_step(opt_a, forward_of(a, x, y))
    training_step(opt_b, forward_of(b, x, y))
    for p, q in zip(a.parameters(), b.parameters(), strict=True):
        assert torch.equal(p, q)


def test_sam_on_refuses_a_model_without_norm_affine_parameters():
    with pytest.raises(NormbenchError, match="affine"):
        create_optimizer("sam_on", tiny_net("none"), lr=0.1)


# --- suites and plans ---------------------------------------------------------------------------


def suite_with(tmp_path, table: str):
    text = tiny_suite(tmp_path).read_text()
    text = text.replace('optimizers = ["sgd"]', 'optimizers = ["sgd", "sam"]')
    path = tmp_path / "s.toml"
    path.write_text(text + f"optimizers.sam = {{ {table} }}\n")
    return path


@pytest.mark.parametrize(
    ("table", "message"),
    [
        ("lr = 0.1, rho = 0.0", "optimizers.sam.rho: Input should be greater than 0"),
        ("lr = 0.1, rho = -0.5", "optimizers.sam.rho: Input should be greater than 0"),
        ('lr = 0.1, base = "sgdd"', "optimizers.sam.base: Unknown optimizer 'sgdd'"),
        ('lr = 0.1, base = "sam_on"', "optimizers.sam.base: 'sam_on' is itself a two-pass"),
        ("lr = 0.1, rhoo = 1.0", "optimizers.sam.rhoo: unknown hyper-parameter"),
        ("rho = 0.1", "missing required hyper-parameter(s) lr"),
        ('lr = 0.1, second_pass_stats = "skip"', "optimizers.sam.second_pass_stats"),
    ],
)
def test_bad_sam_hyper_parameters_are_refused_naming_the_key(tmp_path, table, message):
    path = suite_with(tmp_path, table)
    with pytest.raises(SuiteError) as err:
        load_suite_file(path)
    assert message in str(err.value)
    result = invoke("run", f"--suite={path}", "--budget=smoke", f"--db={tmp_path / 'r.db'}")
    assert result.exit_code == 2 and message in " ".join(result.output.split())
    assert "Traceback" not in result.output and not (tmp_path / "r.db").exists()


def test_base_hyper_parameters_are_checked_against_the_base(tmp_path):
    suite = load_suite_file(suite_with(tmp_path, 'lr = 0.1, rho = 0.2, base = "adamw", eps = 1e-6'))
    assert suite.spec.budgets["smoke"].optimizers["sam"]["eps"] == 1e-6
    with pytest.raises(SuiteError, match="momentum: unknown hyper-parameter for 'sam' with base"):
        load_suite_file(suite_with(tmp_path, 'lr = 0.1, base = "adamw", momentum = 0.9'))


def test_plan_refuses_sam_on_with_a_norm_without_affine_parameters():
    suite = load_suite("sam-on")
    with pytest.raises(NormbenchError, match="'none' has none"):
        plan(suite, "smoke", norms=["none"], optimizers=["sam_on"])
    assert plan(suite, "smoke", norms=["none"], optimizers=["sam"])  # all parameters: fine


# --- real runs ----------------------------------------------------------------------------------


class Stop(Exception):
    pass


def test_a_sam_on_run_resumes_from_its_checkpoint_with_the_same_numbers(cifar_dir, tmp_path):
    path = tiny_suite(tmp_path).read_text().replace("epochs = 1", "epochs = 2")
    path = path.replace('optimizers = ["sgd"]', 'optimizers = ["sam_on"]')
    path += "optimizers.sam_on = { lr = 0.2, rho = 0.5 }\n"
    (tmp_path / "t.toml").write_text(path)
    spec = plan(load_suite(str(tmp_path / "t.toml")), "smoke")[0]
    spec = dataclasses.replace(spec, settings={**spec.settings, "speed_pairs": 0})
    cpu = torch.device("cpu")
    straight = classify.run(spec, device=cpu, data_dir=cifar_dir)
    assert straight.status == "finished" and straight.info["two_pass"]["base"] == "sgd"
    assert straight.info["two_pass"]["perturbed"] == "the norms' affine parameters"
    assert 0 < straight.info["two_pass"]["perturbed_fraction"] < 0.05

    def stop_after_first(epoch, values):
        if epoch == 1:
            raise Stop

    ckpt = tmp_path / "ckpt" / "state.pt"
    with pytest.raises(Stop):
        classify.run(spec, device=cpu, data_dir=cifar_dir, checkpoint=ckpt,
                     progress=classify.Progress(on_epoch=stop_after_first))  # fmt: skip
    resumed = classify.run(spec, device=cpu, data_dir=cifar_dir, checkpoint=ckpt)
    assert resumed.info["resumed_from_epoch"] == 1
    values = {r.name + r.split: r.value for r in straight.metrics if r.name in ("accuracy", "loss")}
    again = {r.name + r.split: r.value for r in resumed.metrics if r.name in ("accuracy", "loss")}
    assert values == again and values


def test_a_sam_run_that_blows_up_is_diverged_with_its_step(cifar_dir, tmp_path):
    text = tiny_suite(tmp_path).read_text().replace('optimizers = ["sgd"]', 'optimizers = ["sam"]')
    (tmp_path / "hot.toml").write_text(text + "optimizers.sam = { lr = 1.0e12, rho = 0.1 }\n")
    spec = plan(load_suite(str(tmp_path / "hot.toml")), "smoke")[0]
    result = classify.run(spec, device=torch.device("cpu"), data_dir=cifar_dir)
    assert result.status == "diverged" and result.diverged_step is not None
    assert f"at step {result.diverged_step}" in result.reason


def test_the_sam_on_smoke_suite_ranks_two_pass_runs_with_their_cost(cifar_dir, tmp_path):
    """The built-in suite end to end through the command line and its workers: clean and
    corruption accuracy, and the second pass's cost as a side-by-side ratio to the base."""
    db = str(tmp_path / "r.db")
    result = smoke_run(f"--db={db}", suite="sam-on", optimizers="sgd,sam_on")
    assert result.exit_code == 0, result.output
    rows = {r["optimizer"]: r for r in leaderboard_json(db, suite="sam-on")}
    assert set(rows) == {"sgd", "sam_on"}
    for r in rows.values():
        assert 0.1 < r["accuracy_mean"] <= 1 and 0 < r["corruption_accuracy_mean"] <= 1
    assert rows["sgd"]["speed_vs_base_optimizer_mean"] is None  # single pass: nothing to compare
    assert 0 < rows["sam_on"]["speed_vs_base_optimizer_mean"] < 1  # two passes cost more
    with open_store(f"sqlite:///{db}").session() as s:
        run = s.scalars(select(Run).where(Run.optimizer == "sam_on")).one()
        assert run.provenance["two_pass"]["base"] == "sgd"
        assert run.provenance["two_pass"]["second_pass_stats"] == "update"
    table = invoke("leaderboard", "--suite=sam-on", "--budget=smoke", f"--db={db}")
    assert "train speed vs base optimizer" in " ".join(table.output.split())


def test_the_protocol_states_the_two_pass_step_and_the_statistics_mode(tmp_path):
    specs = {s.optimizer: s for s in plan(load_suite("sam-on"), "smoke", norms=["batchnorm"])}
    assert "two_pass_step" not in specs["sgd"].protocol
    assert specs["sam_on"].protocol["second_pass_running_statistics"].startswith("updated")
    frozen = suite_with(tmp_path, 'lr = 0.1, second_pass_stats = "freeze"')
    spec = plan(load_suite(str(frozen)), "smoke", optimizers=["sam"])[0]
    assert spec.protocol["second_pass_running_statistics"].startswith("frozen")


def test_both_passes_run_under_bfloat16_autocast_and_the_restore_stays_exact():
    model = tiny_net()
    x, y = batch()
    opt = create_optimizer("sam_on", model, lr=0.1)
    before = snapshot(model)
    seen = []

    def forward():
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = model(x)
            seen.append(out.dtype)
            return out, F.cross_entropy(out, y)

    restored = {}
    base_step = opt.base.step

    def checked_step(*args, **kwargs):
        restored["params"] = snapshot(model)
        return base_step(*args, **kwargs)

    opt.base.step = checked_step
    training_step(opt, forward)
    assert seen == [torch.bfloat16, torch.bfloat16]  # two passes, both in bfloat16
    assert all(p.dtype == torch.float32 for p in model.parameters())
    for old, now in zip(before, restored["params"], strict=True):
        assert torch.equal(old, now)
    assert any(not torch.equal(old, p) for old, p in zip(before, model.parameters(), strict=True))
