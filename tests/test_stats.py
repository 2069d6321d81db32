"""Confidence intervals, paired tests and the Holm correction against hand computations."""

from __future__ import annotations

import math

import pytest
from scipy import stats as sps

from normbench.errors import NormbenchError
from normbench.stats import board_ties, holm, mean_ci, paired_test


def test_mean_ci_is_the_student_t_interval_by_hand():
    # values 1, 2, 3, 6: mean 3, sample variance ((4 + 1 + 0 + 9) / 3) = 14/3
    mean, low, high = mean_ci([1.0, 2.0, 3.0, 6.0])
    half = 3.182446305284263 * math.sqrt(14 / 3) / 2  # t_{0.975, 3} from a t table
    assert mean == 3.0
    assert low == pytest.approx(3.0 - half, rel=1e-9)
    assert high == pytest.approx(3.0 + half, rel=1e-9)


def test_mean_ci_at_another_level_and_with_one_value():
    _, low, high = mean_ci([0.0, 2.0], level=0.9)
    # n = 2: s = sqrt(2), half = t_{0.95, 1} * s / sqrt(2) = 6.313751514675043
    assert (low, high) == pytest.approx((1 - 6.313751514675043, 1 + 6.313751514675043))
    mean, low, high = mean_ci([0.7])
    assert mean == 0.7 and math.isnan(low) and math.isnan(high)


@pytest.mark.parametrize(
    ("values", "level", "message"),
    [([], 0.95, "no values"), ([1.0, math.nan], 0.95, "finite"), ([1.0, 2.0], 1.0, "level")],
)
def test_mean_ci_refuses_bad_input(values, level, message):
    with pytest.raises(NormbenchError, match=message):
        mean_ci(values, level)


def test_identical_samples_are_tied_not_nan():
    a = {0: 0.81, 1: 0.79, 2: 0.80}
    assert paired_test(a, dict(a)) == 1.0
    assert board_ties([a, dict(a)]) == ([None, 1.0], [None, True])


def test_clearly_separated_rows_are_not_tied():
    above = {0: 0.90, 1: 0.91, 2: 0.905, 3: 0.895}
    below = {0: 0.50, 1: 0.52, 2: 0.49, 3: 0.51}
    p = paired_test(above, below)
    assert p < 1e-4
    adjusted, tied = board_ties([above, below])
    assert tied == [None, False] and adjusted[1] == pytest.approx(p)


def test_paired_test_by_hand_and_against_scipy():
    a = {0: 5.0, 1: 7.0, 2: 6.0, 9: 100.0}  # seed 9 has no partner: left out
    b = {0: 4.0, 1: 5.0, 2: 6.0, 3: -1.0}
    # differences 1, 2, 0: mean 1, sd 1, t = 1 / (1 / sqrt 3) = sqrt 3 with 2 degrees of freedom
    by_hand = 2 * sps.t.sf(math.sqrt(3), 2)
    assert paired_test(a, b) == pytest.approx(by_hand, rel=1e-12)
    assert paired_test(a, b) == pytest.approx(sps.ttest_rel([5, 7, 6], [4, 5, 6]).pvalue)
    assert by_hand == pytest.approx(0.2254033307585166)


def test_paired_test_needs_two_shared_seeds_and_a_constant_shift_is_significant():
    assert paired_test({0: 1.0, 1: 2.0}, {1: 1.0, 2: 3.0}) is None
    assert paired_test({0: 2.0, 1: 3.0}, {0: 1.0, 1: 2.0}) == 0.0


def test_holm_by_hand():
    # sorted: 0.01 (x4 = 0.04), 0.02 (x3 = 0.06), 0.03 (x2 = 0.06), 0.04 (x1 = 0.04 -> 0.06)
    assert holm([0.03, 0.01, 0.04, 0.02]) == pytest.approx([0.06, 0.04, 0.06, 0.06])
    assert holm([0.5, 0.9]) == pytest.approx([1.0, 1.0])  # capped at 1
    assert holm([]) == []
    with pytest.raises(NormbenchError, match=r"\[0, 1\]"):
        holm([1.5])


def test_board_ties_correct_over_the_tested_comparisons_only():
    top = {0: 0.90, 1: 0.92, 2: 0.91}
    second = {0: 0.70, 1: 0.71, 2: 0.74}  # well below the top: raw p about 0.003
    lone = {5: 0.5}  # no seed shared with the row above: not tested
    third = {0: 0.60, 1: 0.66, 2: 0.61}
    raw = paired_test(top, second)
    adjusted, tied = board_ties([top, second, lone, None, third])
    # one tested comparison: Holm leaves it as it is
    assert adjusted == [None, pytest.approx(raw), None, None, None]
    assert tied == [None, False, None, None, None]
    adjusted, _ = board_ties([top, second, third])
    raw_third = paired_test(second, third)
    expected = holm([raw, raw_third])
    assert adjusted[1:] == pytest.approx(expected)


# --- per-budget seeds: how many seeds a board's statistics rest on --------------------------------


def test_a_budget_names_its_own_seeds_without_changing_any_run_key(tmp_path):
    from helpers import tiny_suite

    from normbench.errors import SuiteError
    from normbench.suites import load_suite_file, plan

    path = tiny_suite(tmp_path)
    before = plan(load_suite_file(path), "smoke")
    text = path.read_text()
    path.write_text(text.replace("[budgets.smoke]\n", "[budgets.smoke]\nseeds = [0, 3]\n"))
    suite = load_suite_file(path)
    after = plan(suite, "smoke")
    assert [s.seed for s in before] == [0] and [s.seed for s in after] == [0, 3]
    assert after[0].key == before[0].key and "seeds" not in after[0].settings
    assert [s.seed for s in plan(suite, "smoke", seeds=[5])] == [5]  # --seeds wins
    path.write_text(text.replace("[budgets.smoke]\n", "[budgets.smoke]\nseeds = [1, 1]\n"))
    with pytest.raises(SuiteError, match=r"budgets\.smoke\.seeds: a seed is repeated"):
        load_suite_file(path)
    path.write_text(text.replace("[budgets.smoke]\n", "[budgets.smoke]\nseeds = []\n"))
    with pytest.raises(SuiteError, match=r"budgets\.smoke\.seeds"):
        load_suite_file(path)


@pytest.mark.parametrize("name", ["cifar10", "cifar-c", "sam-on", "landscape", "imagenet-c"])
def test_built_in_smoke_gpu_and_full_budgets_run_three_seeds_and_cpu_budgets_one(name):
    from normbench.suites import load_suite, plan

    suite = load_suite(name)
    for budget in suite.spec.budgets:
        seeds = {s.seed for s in plan(suite, budget, norms=["batchnorm"], optimizers=["sgd"])}
        assert seeds == ({0, 1, 2} if budget in ("smoke", "gpu", "full") else {0}), budget
