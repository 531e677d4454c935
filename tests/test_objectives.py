import pytest
import torch

from nbhelpers.objectives import compute_advantages, grpo_advantages, mode_statistics

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
