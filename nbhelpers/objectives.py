"""Which samples enter the loss, and with what advantage, for each training mode.

| mode        | samples in the loss | advantage                                   |
|-------------|---------------------|---------------------------------------------|
| grpo        | all                 | (R - mean_group R) / (std_group R + 1e-4)   |
| psr         | correct only        | +1                                          |
| nsr         | incorrect only      | -1                                          |
| w-reinforce | all                 | +lambda_psr if correct, -1 if incorrect     |
| passk       | all                 | closed-form Pass@k advantage of the group   |

PSR, NSR and W-REINFORCE use no baseline and no std scaling (Zhu et al. 2025, arXiv 2506.01347):
feeding filtered rewards into GRPO's group normalisation would NOT implement them, because the group
mean turns a zeroed reward into a non-zero advantage. ``passk`` is the analytical Pass@k Training of
Chen et al. 2025 (arXiv 2508.10751), on the correctness bits; see :func:`passk_advantages`.
"""

from __future__ import annotations

import math

import torch

from .config import MODES

GRPO_STD_EPS = 1e-4  # TRL's epsilon in (R - mean) / (std + eps)

# What a run's model card says of its mode, and the paper behind it.
MODE_DESCRIPTIONS = {
    "grpo": "GRPO: every sample enters the loss with its group-normalised reward as advantage (TRL's GRPO loss)",
    "psr": "PSR (positive sample reinforcement): only correct samples enter the loss, with advantage +1",
    "nsr": "NSR (negative sample reinforcement): only incorrect samples enter the loss, with advantage -1",
    "w-reinforce": "W-REINFORCE: correct samples with advantage +lambda_psr, incorrect ones with -1",
    "passk": "Pass@k Training with k = {passk_k}: every sample enters the loss with the closed-form advantage of "
             "its group's mean Pass@k over all k-subsets (computed from the group's numbers of correct and "
             "incorrect samples)",
}
MODE_REFERENCES = {
    "grpo": "Shao et al. 2024, DeepSeekMath (arXiv 2402.03300)",
    "psr": "Zhu et al. 2025, The Surprising Effectiveness of Negative Reinforcement in LLM Reasoning "
           "(arXiv 2506.01347)",
}
MODE_REFERENCES["nsr"] = MODE_REFERENCES["w-reinforce"] = MODE_REFERENCES["psr"]
MODE_REFERENCES["passk"] = ("Chen et al. 2025, Pass@k Training for Adaptively Balancing Exploration and Exploitation "
                            "of Large Reasoning Models (arXiv 2508.10751)")


def _check_inputs(mode: str, rewards: torch.Tensor, correct: torch.Tensor, num_generations: int) -> None:
    if mode not in MODES:
        raise ValueError(f"mode must be one of {', '.join(MODES)}, got {mode!r}")
    if rewards.dim() != 1 or correct.dim() != 1 or rewards.numel() != correct.numel():
        raise ValueError(f"rewards and correct must be 1-D of equal length, got shapes "
                         f"{tuple(rewards.shape)} and {tuple(correct.shape)}")
    if num_generations < 1 or rewards.numel() % num_generations:
        raise ValueError(f"{rewards.numel()} samples do not split into groups of num_generations={num_generations}")


def grpo_advantages(rewards: torch.Tensor, num_generations: int) -> torch.Tensor:
    """TRL's group-normalised advantages: (R - group mean) / (group std, Bessel-corrected, + 1e-4)."""
    grouped = rewards.view(-1, num_generations)
    mean = grouped.mean(dim=1, keepdim=True)
    std = grouped.std(dim=1, keepdim=True) if num_generations > 1 else torch.zeros_like(mean)
    return ((grouped - mean) / (std + GRPO_STD_EPS)).reshape(-1)


def passk_group_advantages(n: int, n_neg: int, k: int) -> tuple[float, float]:
    """(A_pos, A_neg) of Pass@k Training (Chen et al. 2025, arXiv 2508.10751, eq. of the analytical form) for a
    group of ``n`` samples of which ``n_neg`` are incorrect, 1 <= k <= n:

        R = 1 - C(n_neg, k) / C(n, k)      the group's mean Pass@k over its k-subsets
        sigma = sqrt(R (1 - R))            their std (Pass@k of a subset is 0 or 1)
        A_pos = (1 - R) / sigma,  A_neg = (1 - R - C(n_neg - 1, k - 1) / C(n - 1, k - 1)) / sigma

    sigma = 0 exactly when every k-subset passes (n_neg < k) or none does (n_neg = n); both advantages are then
    0, as GRPO's zero-variance groups. Elsewhere sigma > 0 and is used as is: no eps (the authors' code divides
    by sigma + 1e-6, a relative change of 1e-6 / sigma). Binomial ratios are quotients of exact integers,
    correctly rounded to float64 (no overflow at any n). At k = 1 this is GRPO on the 0/1 correctness reward
    with the population std: A_pos = (1 - p) / sigma, A_neg = -p / sigma, p the fraction correct.
    """
    if not 1 <= k <= n or not 0 <= n_neg <= n:
        raise ValueError(f"Pass@k advantages need 1 <= k <= n and 0 <= n_neg <= n, got n={n}, n_neg={n_neg}, k={k}")
    fail_all = math.comb(n_neg, k) / math.comb(n, k)  # 1 - R: no correct sample among k drawn without replacement
    if fail_all in (0.0, 1.0):
        return 0.0, 0.0
    mean = 1.0 - fail_all
    sigma = math.sqrt(mean * fail_all)
    fail_others = math.comb(n_neg - 1, k - 1) / math.comb(n - 1, k - 1)  # k - 1 others all incorrect
    return fail_all / sigma, (fail_all - fail_others) / sigma


def passk_advantages(correct: torch.Tensor, num_generations: int, k: int) -> torch.Tensor:
    """Pass@k Training advantages (float32) of 1-D correctness bits grouped in consecutive runs of
    ``num_generations``: each sample gets its group's A_pos or A_neg (:func:`passk_group_advantages`)."""
    if isinstance(k, bool) or not isinstance(k, int) or not 1 <= k <= num_generations:
        raise ValueError(f"passk_k must be an integer in [1, num_generations = {num_generations}], got {k!r}")
    grouped = correct.bool().view(-1, num_generations)
    table = torch.tensor([passk_group_advantages(num_generations, n_neg, k) for n_neg in range(num_generations + 1)],
                         dtype=torch.float64)  # row n_neg: (A_pos, A_neg)
    n_neg = (~grouped).sum(dim=1, keepdim=True).expand_as(grouped)
    return torch.where(grouped, table[n_neg, 0], table[n_neg, 1]).float().reshape(-1)


def compute_advantages(mode: str, rewards: torch.Tensor, correct: torch.Tensor, num_generations: int,
                       lambda_psr: float = 0.1, passk_k: int = 4) -> tuple[torch.Tensor, torch.Tensor]:
    """Advantages (1-D float) and the mask of samples that enter the loss (1-D bool).

    ``rewards`` are summed weighted Chart-RVR rewards, ``correct`` the correctness bits; both are 1-D
    and grouped in consecutive runs of ``num_generations`` completions of one prompt. Left-out samples
    get advantage 0 and ``keep`` False; the trainer also removes them from the loss normaliser.
    ``lambda_psr`` applies to w-reinforce only, ``passk_k`` (1 <= k <= num_generations) to passk only.
    """
    rewards = torch.as_tensor(rewards, dtype=torch.float32)
    correct = torch.as_tensor(correct).bool()
    _check_inputs(mode, rewards, correct, num_generations)
    if mode == "grpo":
        return grpo_advantages(rewards, num_generations), torch.ones_like(correct)
    if mode == "psr":
        return correct.float(), correct.clone()
    if mode == "nsr":
        return -(~correct).float(), ~correct
    if mode == "passk":
        return passk_advantages(correct, num_generations, passk_k), torch.ones_like(correct)
    if not 0 < lambda_psr <= 1:
        raise ValueError(f"lambda_psr must be in (0, 1], got {lambda_psr}")
    advantages = torch.where(correct, torch.full_like(rewards, lambda_psr), torch.full_like(rewards, -1.0))
    return advantages, torch.ones_like(correct)


def correctness(rewards_per_func: torch.Tensor, weights: torch.Tensor, threshold: float,
                accuracy_column: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(weighted total reward, correctness bit) per sample, the bits being the c_i of the objectives.

    ``rewards_per_func`` is (samples, functions), NaN where a function gave no value; ``weights`` one per function.
    The total is the weighted sum with NaN left out. A sample is correct when ``threshold`` <= its reward in
    column ``accuracy_column`` (correctness_from accuracy; NaN counts as 0), or, with ``accuracy_column`` None
    (correctness_from total), <= its total.
    """
    total = (rewards_per_func * weights.to(rewards_per_func.device).unsqueeze(0)).nansum(dim=1)
    if accuracy_column is None:
        return total, total >= threshold
    return total, torch.nan_to_num(rewards_per_func[:, accuracy_column], nan=0.0) >= threshold


def mode_statistics(mode: str, correct: torch.Tensor, keep: torch.Tensor, rewards: torch.Tensor) -> dict[str, float]:
    """Per-step counts for logging: kept positives/negatives (samples), whether the step is empty, mean reward."""
    correct, keep = correct.bool(), keep.bool()
    return {
        "kept_positive": float((keep & correct).sum()),
        "kept_negative": float((keep & ~correct).sum()),
        "samples": float(correct.numel()),
        "empty": float(not bool(keep.any())),
        "total_reward": float(rewards.float().mean()) if rewards.numel() else 0.0,
        "accuracy": float(correct.float().mean()) if correct.numel() else 0.0,
    }
