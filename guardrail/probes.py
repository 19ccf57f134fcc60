"""Linear probes and the measures that choose them, shared by the gate and the latent cost model.

A probe is a direction and a bias on raw activations; its threshold is always set on data it
was not fitted on.
"""

from __future__ import annotations

import torch


def fit_probe(
    harmful: torch.Tensor, harmless: torch.Tensor, l2: float = 1e-2
) -> tuple[torch.Tensor, float]:
    """L2-regularised, class-balanced logistic regression; returns (weight, bias) in raw space.

    Features are standardised for the fit and the scaling folded back into the weights, so
    the gate applies one dot product to raw activations at serving time.
    """
    x = torch.cat([harmful, harmless]).float()
    y = torch.cat([torch.ones(len(harmful)), torch.zeros(len(harmless))])
    mean, std = x.mean(0), x.std(0) + 1e-6
    z = (x - mean) / std
    weight = torch.zeros(x.shape[1], requires_grad=True)
    bias = torch.zeros(1, requires_grad=True)
    balance = torch.tensor(len(harmless) / max(len(harmful), 1))
    optimiser = torch.optim.LBFGS(
        [weight, bias], max_iter=300, line_search_fn="strong_wolfe", tolerance_grad=1e-6
    )

    def closure() -> torch.Tensor:
        optimiser.zero_grad()
        logits = z @ weight + bias
        loss = (
            torch.nn.functional.binary_cross_entropy_with_logits(logits, y, pos_weight=balance)
            + 0.5 * l2 * weight.square().sum()
        )
        loss.backward()  # type: ignore[no-untyped-call]
        return loss

    with torch.enable_grad():
        optimiser.step(closure)  # type: ignore[no-untyped-call]
    raw_weight = (weight / std).detach()
    raw_bias = float(bias.detach() - (mean * raw_weight).sum())
    return raw_weight, raw_bias


def threshold_at_fpr(harmless_scores: torch.Tensor, target_fpr: float) -> float:
    """The lowest threshold that lets at most `target_fpr` of these harmless scores fire."""
    ordered = harmless_scores.float().sort(descending=True).values
    allowed = int(target_fpr * len(ordered))
    return float(ordered[min(allowed, len(ordered) - 1)])


def rates(
    scores_harmful: torch.Tensor, scores_harmless: torch.Tensor, threshold: float
) -> tuple[float, float]:
    """(true-positive rate, false-positive rate) at a threshold."""
    tpr = float((scores_harmful > threshold).float().mean()) if len(scores_harmful) else 0.0
    fpr = float((scores_harmless > threshold).float().mean()) if len(scores_harmless) else 0.0
    return tpr, fpr


def auroc(scores_harmful: torch.Tensor, scores_harmless: torch.Tensor) -> float:
    """Probability that a harmful prompt outscores a harmless one (ties count half)."""
    diff = scores_harmful.float()[:, None] - scores_harmless.float()[None, :]
    return float((diff > 0).float().mean() + 0.5 * (diff == 0).float().mean())


__all__ = ["auroc", "fit_probe", "rates", "threshold_at_fpr"]
