"""The latent critic of InferenceGuard: an MLP on the model's last hidden state h and the
safety state z (budget left) that estimates the augmented value of a partial answer: the
(discounted) reward of the finished answer when it stays within budget, a penalty once it
does not.

It predicts that value as a correction to what the prefix already scores:
V(h, z) = A(prefix) + C(h, z), where A is the prefix's augmented reward (its reward within
budget, the penalty over it) and C is this network. The correction is the part the reward
model cannot read from the text so far (where the answer is heading); learning only that
part keeps a critic trained on a few thousand readings from doing worse than the prefix's
own score. Trained by calibration from the target model's own rollouts
(`guardrail.calibrate.safety`); stored as a safetensors state dict.
"""

from __future__ import annotations

import torch
from torch import nn


class Critic(nn.Module):
    """Two hidden layers; inputs standardised with statistics kept as buffers."""

    h_mean: torch.Tensor
    h_std: torch.Tensor
    z_scale: torch.Tensor

    def __init__(self, hidden_size: int, width: int = 256) -> None:
        super().__init__()
        self.width = width
        self.net = nn.Sequential(
            nn.Linear(hidden_size + 1, width),
            nn.GELU(),
            nn.Linear(width, width),
            nn.GELU(),
            nn.Linear(width, 1),
        )
        self.register_buffer("h_mean", torch.zeros(hidden_size))
        self.register_buffer("h_std", torch.ones(hidden_size))
        self.register_buffer("z_scale", torch.ones(()))

    def forward(self, h: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        h = (h.float() - self.h_mean) / self.h_std
        z = z.float().reshape(-1, 1) / self.z_scale
        out: torch.Tensor = self.net(torch.cat([h, z], dim=-1)).squeeze(-1)
        return out

    @torch.inference_mode()
    def value(self, h: torch.Tensor, z: torch.Tensor) -> list[float]:
        return [float(v) for v in self(h, z)]


def train_critic(
    h: torch.Tensor,
    z: torch.Tensor,
    target: torch.Tensor,
    *,
    epochs: int = 50,
    batch_size: int = 64,
    lr: float = 1e-3,
    width: int = 256,
    seed: int = 0,
) -> Critic:
    """Regress `target` on (h, z) with Adam and mean squared error."""
    generator = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    critic = Critic(h.shape[1], width)
    critic.h_mean.copy_(h.float().mean(0))
    critic.h_std.copy_(h.float().std(0) + 1e-4)
    critic.z_scale.copy_(z.float().abs().mean().clamp(min=1e-3))
    optimiser = torch.optim.Adam(critic.parameters(), lr=lr, weight_decay=1e-4)
    with torch.enable_grad():
        critic.train()
        for _ in range(epochs):
            order = torch.randperm(len(target), generator=generator)
            for start in range(0, len(order), batch_size):
                rows = order[start : start + batch_size]
                loss = nn.functional.mse_loss(critic(h[rows], z[rows]), target[rows].float())
                optimiser.zero_grad()
                loss.backward()  # type: ignore[no-untyped-call]
                optimiser.step()
    critic.train(False)
    return critic


__all__ = ["Critic", "train_critic"]
