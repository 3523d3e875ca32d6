"""DDIM sampling arithmetic (docs/method.md, "The model" and section 2), independent of any model.

With "leading" spacing and steps_offset 1, 50 steps give t = 981, 961, ..., 1 and a stride of 20.
The previous level of t is t - stride; below 0 it is alphas_cumprod[0] (set_alpha_to_one off).

The model's output is read in its own parametrisation (the scheduler config's ``prediction_type``):
``epsilon`` predicts the noise, ``v_prediction`` (SD 2.x at 768 px) predicts
v = sqrt(a) eps - sqrt(1 - a) x0. Every step, inversion and x0 prediction goes through
:meth:`DDIM.split`, which turns either into (x0, eps) at the level of the latent it was predicted on.
"""

from __future__ import annotations

import torch

from gooddrag.core.errors import ConfigError

#: model parametrisations the sampler reads (diffusers' ``prediction_type`` names)
PREDICTION_TYPES = ("epsilon", "v_prediction")


def check_prediction_type(prediction_type: str, model: str = "the model") -> str:
    """``prediction_type`` if the sampler reads it; else one line naming the model and what works."""
    if prediction_type not in PREDICTION_TYPES:
        raise ConfigError(f"{model} predicts {prediction_type!r} (its scheduler config's prediction_type); "
                          f"gooddrag reads {' or '.join(PREDICTION_TYPES)}: use a model trained for one of those")
    return prediction_type


def ddim_timesteps(num_steps: int, num_train_timesteps: int = 1000, steps_offset: int = 1) -> list[int]:
    """Leading-spaced DDIM timesteps, largest first."""
    stride = num_train_timesteps // num_steps
    return [i * stride + steps_offset for i in range(num_steps)][::-1]


def start_index(num_steps: int, inversion_strength: float) -> int:
    """Index of the first denoising step after inverting round(strength * num_steps) steps."""
    return num_steps - int(round(inversion_strength * num_steps))


class DDIM:
    """Deterministic DDIM step and inversion over a scheduler's alphas_cumprod.

    ``pred`` below is the model output in ``prediction_type``: noise, or v."""

    def __init__(self, alphas_cumprod: torch.Tensor, num_steps: int, num_train_timesteps: int = 1000,
                 steps_offset: int = 1, prediction_type: str = "epsilon"):
        self.alphas_cumprod = alphas_cumprod.double().cpu()
        self.num_steps = num_steps
        self.stride = num_train_timesteps // num_steps
        self.timesteps = ddim_timesteps(num_steps, num_train_timesteps, steps_offset)
        self.prediction_type = check_prediction_type(prediction_type)

    def alpha(self, t: int) -> float:
        return float(self.alphas_cumprod[t] if t >= 0 else self.alphas_cumprod[0])

    def split(self, z: torch.Tensor, pred: torch.Tensor, a: float) -> tuple[torch.Tensor, torch.Tensor]:
        """(x0, eps) of a latent z at noise level a (alphas_cumprod) from the model's prediction."""
        if self.prediction_type == "v_prediction":
            x0 = a ** 0.5 * z - (1 - a) ** 0.5 * pred
            return x0, a ** 0.5 * pred + (1 - a) ** 0.5 * z
        return (z - (1 - a) ** 0.5 * pred) / a ** 0.5, pred

    def step(self, z: torch.Tensor, pred: torch.Tensor, t: int) -> torch.Tensor:
        """Denoise one step from t to t - stride (eta 0)."""
        return self._move(z, pred, self.alpha(t), self.alpha(t - self.stride))

    def invert_step(self, z: torch.Tensor, pred: torch.Tensor, t: int) -> torch.Tensor:
        """Noise one step from t - stride up to t (pred made on z at level t - stride, given t; read
        at z's own level, as diffusers' DDIMInverseScheduler does)."""
        return self._move(z, pred, self.alpha(t - self.stride), self.alpha(t))

    def predict_x0(self, z: torch.Tensor, pred: torch.Tensor, t: int) -> torch.Tensor:
        """The clean latent the model predicts from z at level t: what the image is becoming."""
        return self.split(z, pred, self.alpha(t))[0]

    def noise(self, z: torch.Tensor, pred: torch.Tensor, t: int) -> torch.Tensor:
        """The noise the model predicts in z at level t (the prediction itself for epsilon models)."""
        return self.split(z, pred, self.alpha(t))[1]

    def add_noise(self, x0: torch.Tensor, eps: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """q(z_t | x0) with the given noise; ``t`` (B,) timesteps, x0 and eps (B, C, h, w)."""
        a = self.alphas_cumprod.to(x0.device)[t].float().view(-1, *[1] * (x0.dim() - 1))
        return a.sqrt() * x0 + (1 - a).sqrt() * eps

    def target(self, x0: torch.Tensor, eps: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """What the model is trained to output for z_t = add_noise(x0, eps, t) (the LoRA's target)."""
        if self.prediction_type == "v_prediction":
            a = self.alphas_cumprod.to(x0.device)[t].float().view(-1, *[1] * (x0.dim() - 1))
            return a.sqrt() * eps - (1 - a).sqrt() * x0
        return eps

    def _move(self, z: torch.Tensor, pred: torch.Tensor, a_from: float, a_to: float) -> torch.Tensor:
        x0, eps = self.split(z, pred, a_from)
        return a_to ** 0.5 * x0 + (1 - a_to) ** 0.5 * eps
