"""Which samples enter the loss, and with what advantage, for each training mode.

| mode        | samples in the loss | advantage                                   |
|-------------|---------------------|---------------------------------------------|
| grpo        | all                 | (R - mean_group R) / (std_group R + 1e-4)   |
| psr         | correct only        | +1                                          |
| nsr         | incorrect only      | -1                                          |
| w-reinforce | all                 | +lambda_psr if correct, -1 if incorrect     |

PSR, NSR and W-REINFORCE use no baseline and no std scaling (Zhu et al. 2025, arXiv 2506.01347):
feeding filtered rewards into GRPO's group normalisation would NOT implement them, because the group
mean turns a zeroed reward into a non-zero advantage.
"""

from __future__ import annotations

import torch

from .config import MODES

GRPO_STD_EPS = 1e-4  # TRL's epsilon in (R - mean) / (std + eps)


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


def compute_advantages(mode: str, rewards: torch.Tensor, correct: torch.Tensor, num_generations: int,
                       lambda_psr: float = 0.1) -> tuple[torch.Tensor, torch.Tensor]:
    """Advantages (1-D float) and the mask of samples that enter the loss (1-D bool).

    ``rewards`` are summed weighted Chart-RVR rewards, ``correct`` the correctness bits; both are 1-D
    and grouped in consecutive runs of ``num_generations`` completions of one prompt. Left-out samples
    get advantage 0 and ``keep`` False; the trainer also removes them from the loss normaliser.
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
    if not 0 < lambda_psr <= 1:
        raise ValueError(f"lambda_psr must be in (0, 1], got {lambda_psr}")
    advantages = torch.where(correct, torch.full_like(rewards, lambda_psr), torch.full_like(rewards, -1.0))
    return advantages, torch.ones_like(correct)


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
