import itertools
import math
import statistics

import pytest
import torch

from nbhelpers.config import MODES
from nbhelpers.objectives import MODE_DESCRIPTIONS, MODE_REFERENCES, compute_advantages, correctness, \
    grpo_advantages, mode_statistics, passk_advantages, passk_group_advantages

C = [True, False, False, True]  # two groups of two
R = [5.0, 1.0, 2.0, 6.0]

ROWS = [
    # mode, lambda, expected advantages, expected keep
    ("psr", 0.1, [1.0, 0.0, 0.0, 1.0], [True, False, False, True]),
    ("nsr", 0.1, [0.0, -1.0, -1.0, 0.0], [False, True, True, False]),
    ("w-reinforce", 0.1, [0.1, -1.0, -1.0, 0.1], [True, True, True, True]),
    ("w-reinforce", 0.5, [0.5, -1.0, -1.0, 0.5], [True, True, True, True]),
]


@pytest.mark.parametrize("mode,lam,expected,keep", ROWS)
def test_advantage_table(mode, lam, expected, keep):
    adv, kept = compute_advantages(mode, torch.tensor(R), torch.tensor(C), 2, lambda_psr=lam)
    assert adv.dtype == torch.float32 and kept.dtype == torch.bool
    assert torch.allclose(adv, torch.tensor(expected))
    assert kept.tolist() == keep


def test_no_group_baseline_for_filtered_modes():
    # A group where every sample is correct: GRPO gives zero advantage, PSR still +1 each.
    rewards, correct = torch.tensor([3.0, 3.0]), torch.tensor([True, True])
    assert torch.allclose(compute_advantages("grpo", rewards, correct, 2)[0], torch.zeros(2))
    assert compute_advantages("psr", rewards, correct, 2)[0].tolist() == [1.0, 1.0]
    # Advantages of PSR do not depend on the rewards' values at all.
    a1 = compute_advantages("psr", torch.tensor([9.0, -4.0]), correct, 2)[0]
    assert a1.tolist() == [1.0, 1.0]


def test_grpo_matches_trl_formula():
    from trl.trainer.utils import nanstd

    rewards = torch.tensor([5.0, 1.0, 2.0, 6.0, 0.5, 0.5])
    adv, keep = compute_advantages("grpo", rewards, torch.zeros(6, dtype=torch.bool), 3)
    grouped = rewards.view(-1, 3)
    mean = grouped.mean(1).repeat_interleave(3)
    std = nanstd(grouped, dim=1).repeat_interleave(3)
    assert torch.allclose(adv, (rewards - mean) / (std + 1e-4))
    assert keep.all()
    assert torch.allclose(grpo_advantages(rewards, 3), adv)


@pytest.mark.parametrize("args,match", [
    (("bogus", [1.0], [True], 1), "mode"),
    (("psr", [1.0, 2.0], [True], 1), "equal length"),
    (("psr", [1.0, 2.0, 3.0], [True, True, False], 2), "groups"),
    (("w-reinforce", [1.0, 2.0], [True, False], 2, 0.0), "lambda_psr"),
    (("passk", [1.0, 2.0], [True, False], 2, 0.1, 0), "passk_k"),
    (("passk", [1.0, 2.0], [True, False], 2, 0.1, 3), "passk_k"),
    (("passk", [1.0, 2.0], [True, False], 2, 0.1, 1.0), "passk_k"),
    (("passk", [1.0, 2.0], [True, False], 2, 0.1, True), "passk_k"),
])
def test_bad_inputs_raise(args, match):
    mode, r, c, g, *rest = args
    with pytest.raises(ValueError, match=match):
        compute_advantages(mode, torch.tensor(r), torch.tensor(c), g, *rest)


def test_mode_statistics():
    correct = torch.tensor([True, False, False, False])
    adv, keep = compute_advantages("nsr", torch.tensor([4.0, 4.0, 4.12, 4.36]), correct, 4)
    stats = mode_statistics("nsr", correct, keep, torch.tensor([4.0, 4.0, 4.12, 4.36]))
    assert stats["kept_negative"] == 3 and stats["kept_positive"] == 0 and stats["empty"] == 0
    assert stats["total_reward"] == pytest.approx(4.12)
    _, keep = compute_advantages("psr", torch.zeros(2), torch.zeros(2, dtype=torch.bool), 2)
    empty = mode_statistics("psr", torch.zeros(2, dtype=torch.bool), keep, torch.zeros(2))
    assert empty["empty"] == 1


# ------------------------------------------------------------------------------------------ passk
PASSK_TABLE = [  # n, n_neg, k, A_pos, A_neg by hand from the paper's formulas (arXiv 2508.10751, RUCAIBox code)
    (4, 3, 2, 1.0, -1 / 3),  # R = 1 - 3/6 = 1/2, sigma = 1/2, A_neg = (1/2 - 2/3) / (1/2)
    (4, 2, 2, 1 / math.sqrt(5), -1 / math.sqrt(5)),  # R = 5/6, sigma = sqrt(5)/6, A_neg = (1/6 - 1/3) / sigma
    (8, 6, 4, 3 / math.sqrt(33), -1 / math.sqrt(33)),  # 1 - R = 15/70 = 3/14, C(5,3)/C(7,3) = 2/7
    (8, 1, 1, 1 / math.sqrt(7), -math.sqrt(7)),  # k = 1: R = 7/8, sigma = sqrt(7)/8
    (5, 4, 3, math.sqrt(2 / 3), -math.sqrt(2 / 3) / 4),  # 1 - R = 4/10, C(3,2)/C(4,2) = 1/2, sigma = sqrt(.24)
    (4, 0, 2, 0.0, 0.0),  # all correct: sigma = 0
    (4, 4, 2, 0.0, 0.0),  # all incorrect: sigma = 0
    (8, 3, 4, 0.0, 0.0),  # n_neg < k: every 4-subset holds a correct sample, sigma = 0
    (4, 2, 4, 0.0, 0.0),  # k = n: one subset, sigma = 0
]


@pytest.mark.parametrize("n,n_neg,k,a_pos,a_neg", PASSK_TABLE)
def test_passk_advantages_match_the_papers_formulas(n, n_neg, k, a_pos, a_neg):
    assert passk_group_advantages(n, n_neg, k) == pytest.approx((a_pos, a_neg), rel=1e-12, abs=1e-15)
    correct = torch.tensor([False] * n_neg + [True] * (n - n_neg))[torch.randperm(n, generator=torch.Generator()
                                                                                 .manual_seed(n * 100 + n_neg))]
    expected = torch.where(correct, torch.tensor(a_pos), torch.tensor(a_neg))
    adv, keep = compute_advantages("passk", torch.zeros(n), correct, n, passk_k=k)
    torch.testing.assert_close(adv, expected, rtol=1e-6, atol=1e-7)
    assert adv.dtype == torch.float32 and keep.all()


def brute_force_passk(correct: list[bool], k: int) -> list[float]:
    """The paper's derivation by enumeration: every k-subset S of the group is a "group" with reward
    pass(S) = max_i c_i; its normalised advantage is (pass(S) - mean) / std, mean and population std over all
    k-subsets; a sample's advantage is the mean of the normalised advantages of the subsets that contain it
    (0 for every sample when std = 0)."""
    subsets = list(itertools.combinations(range(len(correct)), k))
    passes = [float(any(correct[i] for i in s)) for s in subsets]
    mean, std = statistics.fmean(passes), statistics.pstdev(passes)
    if std == 0:
        return [0.0] * len(correct)
    return [statistics.fmean((p - mean) / std for s, p in zip(subsets, passes) if i in s) for i in range(len(correct))]


BRUTE_CASES = [(bits, k) for n in range(2, 7) for bits in itertools.product([False, True], repeat=n)
               for k in range(1, n + 1)]


def test_passk_advantages_equal_the_brute_force_over_all_k_subsets():
    """Every correctness pattern of groups of 2 to 6 samples and every k <= n (1,000+ cases), as one batch per
    (n, k), so the grouping of consecutive runs is checked too."""
    by_shape: dict[tuple[int, int], list] = {}
    for bits, k in BRUTE_CASES:
        by_shape.setdefault((len(bits), k), []).append(bits)
    for (n, k), groups in by_shape.items():
        flat = torch.tensor([b for bits in groups for b in bits])
        expected = torch.tensor([a for bits in groups for a in brute_force_passk(list(bits), k)])
        torch.testing.assert_close(passk_advantages(flat, n, k), expected.float(), rtol=1e-5, atol=1e-6,
                                   msg=f"n={n} k={k}")


@pytest.mark.parametrize("g", [2, 4, 8, 16])
def test_passk_at_k1_is_grpo_on_correctness_with_the_population_std(g):
    correct = torch.rand(64 * g, generator=torch.Generator().manual_seed(g)) < 0.4
    correct[:g] = True  # an all-correct group
    correct[g:2 * g] = False  # an all-incorrect group
    grouped = correct.float().view(-1, g)
    std = grouped.std(dim=1, unbiased=False, keepdim=True)
    grpo = torch.where(std > 0, (grouped - grouped.mean(dim=1, keepdim=True)) / std.clamp(min=1e-30),
                       torch.zeros_like(grouped)).reshape(-1)
    adv, keep = compute_advantages("passk", torch.randn(64 * g), correct, g, passk_k=1)
    torch.testing.assert_close(adv, grpo, rtol=1e-6, atol=1e-6)
    assert keep.all() and adv.abs().max() > 0


@pytest.mark.parametrize("n,k", [(256, 1), (256, 4), (256, 128), (256, 255), (200, 64)])
def test_passk_binomials_do_not_overflow_at_large_groups(n, k):
    """Against the formulas in log space (lgamma), every n_neg; a group's advantages sum to zero."""
    def log_comb(a, b):
        return math.lgamma(a + 1) - math.lgamma(b + 1) - math.lgamma(a - b + 1)

    for n_neg in range(n + 1):
        a_pos, a_neg = passk_group_advantages(n, n_neg, k)
        assert math.isfinite(a_pos) and math.isfinite(a_neg)
        if n_neg < k or n_neg == n:
            assert (a_pos, a_neg) == (0.0, 0.0)
            continue
        fail_all = math.exp(log_comb(n_neg, k) - log_comb(n, k))
        fail_others = math.exp(log_comb(n_neg - 1, k - 1) - log_comb(n - 1, k - 1))
        sigma = math.sqrt((1 - fail_all) * fail_all)
        assert (a_pos, a_neg) == pytest.approx((fail_all / sigma, (fail_all - fail_others) / sigma), rel=1e-9)
        assert (n - n_neg) * a_pos + n_neg * a_neg == pytest.approx(0.0, abs=1e-9 * max(a_pos, 1.0))


def test_passk_uses_correctness_not_the_rewards():
    correct = torch.tensor([True, False, False, False])
    a = compute_advantages("passk", torch.tensor([9.0, 1.0, 2.0, 3.0]), correct, 4, passk_k=2)[0]
    b = compute_advantages("passk", torch.tensor([0.0, 7.0, -2.0, 5.0]), correct, 4, passk_k=2)[0]
    assert torch.equal(a, b) and a.tolist() == pytest.approx([1.0, -1 / 3, -1 / 3, -1 / 3])


NAN = float("nan")
# Three samples' rewards from two functions (accuracy, then format), NaN where a function gave none.
REWARDS = [[1.0, 2.0], [0.0, 2.0], [NAN, 1.5]]


@pytest.mark.parametrize("weights,threshold,accuracy_column,totals,correct", [
    ([1.0, 1.0], 0.5, 0, [3.0, 2.0, 1.5], [True, False, False]),      # accuracy: a NaN accuracy counts as 0
    ([1.0, 1.0], 2.5, None, [3.0, 2.0, 1.5], [True, False, False]),   # total: NaN rewards leave the sum
    ([2.0, 0.5], 1.0, None, [3.0, 1.0, 0.75], [True, True, False]),   # the weights make the total
    ([1.0, 1.0], 0.0, 0, [3.0, 2.0, 1.5], [True, True, True]),        # threshold 0: every sample
])
def test_correctness_thresholds_the_accuracy_or_the_weighted_total(weights, threshold, accuracy_column, totals,
                                                                    correct):
    total, bits = correctness(torch.tensor(REWARDS), torch.tensor(weights), threshold, accuracy_column)
    assert total.tolist() == totals and bits.tolist() == correct


def test_every_mode_has_the_description_and_reference_of_its_model_card():
    assert set(MODE_DESCRIPTIONS) == set(MODE_REFERENCES) == set(MODES)

