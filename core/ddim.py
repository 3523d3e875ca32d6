"""DDIM sampling arithmetic (docs/method.md, "The model" and section 2), independent of any model.

With "leading" spacing and steps_offset 1, 50 steps give t = 981, 961, ..., 1 and a stride of 20.
The previous level of t is t - stride; below 0 it is alphas_cumprod[0] (set_alpha_to_one off).
"""

from __future__ import annotations

import torch


def ddim_timesteps(num_steps: int, num_train_timesteps: int = 1000, steps_offset: int = 1) -> list[int]:
    """Leading-spaced DDIM timesteps, largest first."""
    stride = num_train_timesteps // num_steps
    return [i * stride + steps_offset for i in range(num_steps)][::-1]


def start_index(num_steps: int, inversion_strength: float) -> int:
    """Index of the first denoising step after inverting round(strength * num_steps) steps."""
    return num_steps - int(round(inversion_strength * num_steps))


class DDIM:
    """Deterministic DDIM step and inversion over a scheduler's alphas_cumprod."""

    def __init__(self, alphas_cumprod: torch.Tensor, num_steps: int, num_train_timesteps: int = 1000,
                 steps_offset: int = 1):
        self.alphas_cumprod = alphas_cumprod.double().cpu()
        self._alphas: list[float] = self.alphas_cumprod.tolist()  # plain floats: a step reads no tensor
        self.num_steps = num_steps
        self.stride = num_train_timesteps // num_steps
        self.timesteps = ddim_timesteps(num_steps, num_train_timesteps, steps_offset)

    def alpha(self, t: int) -> float:
        return self._alphas[t if t >= 0 else 0]

    def step(self, z: torch.Tensor, eps: torch.Tensor, t: int) -> torch.Tensor:
        """Denoise one step from t to t - stride (eta 0)."""
        return self._move(z, eps, self.alpha(t), self.alpha(t - self.stride))

    def invert_step(self, z: torch.Tensor, eps: torch.Tensor, t: int) -> torch.Tensor:
        """Noise one step from t - stride up to t (eps predicted on z at level t - stride, given t)."""
        return self._move(z, eps, self.alpha(t - self.stride), self.alpha(t))

    def predict_x0(self, z: torch.Tensor, eps: torch.Tensor, t: int) -> torch.Tensor:
        """The clean latent the model predicts from z at level t: what the image is becoming."""
        a = self.alpha(t)
        return (z - (1 - a) ** 0.5 * eps) / a ** 0.5

    @staticmethod
    def _move(z: torch.Tensor, eps: torch.Tensor, a_from: float, a_to: float) -> torch.Tensor:
        x0 = (z - (1 - a_from) ** 0.5 * eps) / a_from ** 0.5
        return a_to ** 0.5 * x0 + (1 - a_to) ** 0.5 * eps
