"""Mixture-of-Students: staged knowledge distillation of an MoE teacher into a smaller student.

DeepSpeed-MoE (Rajbhandari et al., 2022, section 4) distils a PR-MoE teacher into a shallower
PR-MoE student (MoS) and *stops* distilling part way through training: the KD term helps early,
and later holds the student back once it is close to the teacher's quality ("staged KD").

    distiller = moe.distill.Distiller(teacher, moe.distill.DistillConfig(temperature=1.0, stop_step=400))
    for step, (inputs, targets) in enumerate(batches):
        logits = student(inputs)
        loss = cross_entropy(logits, targets) + moe.aux_loss(student)
        loss = loss + distiller.term(step, logits, inputs)      # 0 (and no teacher forward) from stop_step on
        ...

The term is Megatron-DeepSpeed's `calculate_mos_loss`:

    kd = weight * T^2 * mean over tokens of KL(softmax(teacher / T) || softmax(student / T))

with the KL summed over the vocabulary, T the temperature, and `weight` its kd_beta_ce; it is
added to the student's own loss (the cross-entropy keeps its weight 1, as there). Teacher logits
come from a frozen teacher in eval mode under torch.no_grad(): no gradient, no aux losses added
to the student's, no router state updated. The helper is model-agnostic: logits [..., V].
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["DistillConfig", "Distiller", "kd_loss"]


@dataclass(frozen=True, kw_only=True)
class DistillConfig:
    """Settings of staged distillation.

    Attributes:
        weight: scale of the KD term (Megatron-DeepSpeed's kd_beta_ce; 1.0 there by default).
        temperature: T; both distributions are softened by it and the term multiplied by T^2
            (so its gradient scale does not shrink with T).
        stop_step: the KD term applies at steps < stop_step and is 0 from stop_step on (the
            paper's staged KD); None = distil for the whole run.
    """

    weight: float = 1.0
    temperature: float = 1.0
    stop_step: int | None = None

    def __post_init__(self) -> None:
        if isinstance(self.weight, bool) or not isinstance(self.weight, (int, float)) or not self.weight >= 0:
            raise ValueError(f"weight must be a number >= 0, got {self.weight!r}")
        if (
            isinstance(self.temperature, bool)
            or not isinstance(self.temperature, (int, float))
            or not math.isfinite(self.temperature)
            or self.temperature <= 0
        ):
            raise ValueError(f"temperature must be a finite number > 0, got {self.temperature!r}")
        if self.stop_step is not None and (
            isinstance(self.stop_step, bool) or not isinstance(self.stop_step, int) or self.stop_step < 0
        ):
            raise ValueError(f"stop_step must be None or an int >= 0, got {self.stop_step!r}")


def kd_loss(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    temperature: float = 1.0,
    mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """T^2 * mean over tokens of KL(softmax(teacher / T) || softmax(student / T)), computed in fp32.

    Args:
        student_logits: [..., V], with gradient.
        teacher_logits: [..., V], same shape (detached here).
        temperature: T > 0.
        mask: optional bool [...] (False = padding, excluded from the mean).

    Returns:
        a scalar tensor (0 when the mask selects no token).
    """
    if student_logits.shape != teacher_logits.shape:
        raise ValueError(
            f"student logits {tuple(student_logits.shape)} and teacher logits {tuple(teacher_logits.shape)} "
            "differ in shape: the student must predict over the teacher's vocabulary"
        )
    v = student_logits.shape[-1]
    log_p_student = F.log_softmax(student_logits.float().reshape(-1, v) / temperature, dim=-1)
    log_p_teacher = F.log_softmax(teacher_logits.detach().float().reshape(-1, v) / temperature, dim=-1)
    kl_T = (log_p_teacher.exp() * (log_p_teacher - log_p_student)).sum(-1)
    if mask is not None:
        if mask.shape != student_logits.shape[:-1] or mask.dtype != torch.bool:
            raise ValueError(
                f"mask must be bool of shape {tuple(student_logits.shape[:-1])}, got {mask.dtype} {tuple(mask.shape)}"
            )
        keep = mask.reshape(-1)
        kl_T = kl_T[keep]
        if kl_T.numel() == 0:
            return student_logits.sum() * 0.0
    return temperature * temperature * kl_T.mean()


class Distiller:
    """A frozen teacher plus the staged KD term.

    Args:
        teacher: a module whose forward maps the student's inputs to logits [..., V] (or a
            tuple/dict whose first element / "logits" entry is the logits). It is put in eval
            mode and its parameters get requires_grad=False.
        config: DistillConfig.
        forward: optional callable teacher_inputs -> logits, for teachers called differently.
    """

    def __init__(
        self,
        teacher: nn.Module,
        config: DistillConfig | None = None,
        forward: Callable[..., torch.Tensor] | None = None,
    ) -> None:
        self.teacher = teacher.eval()
        for p in teacher.parameters():
            p.requires_grad_(False)
        self.config = config if config is not None else DistillConfig()
        self._forward = forward

    def active(self, step: int) -> bool:
        """Whether the KD term applies at `step` (0-based optimizer step)."""
        stop = self.config.stop_step
        return self.config.weight > 0 and (stop is None or step < stop)

    @torch.no_grad()
    def teacher_logits(self, *inputs: Any, **kwargs: Any) -> torch.Tensor:
        """The teacher's logits for the student's inputs (eval mode, no gradient)."""
        self.teacher.eval()
        out = self._forward(*inputs, **kwargs) if self._forward is not None else self.teacher(*inputs, **kwargs)
        if isinstance(out, dict):
            out = out["logits"]
        elif isinstance(out, (tuple, list)):
            out = out[0]
        elif hasattr(out, "logits"):
            out = out.logits
        return out

    def term(
        self, step: int, student_logits: torch.Tensor, *inputs: Any, mask: torch.Tensor | None = None, **kwargs: Any
    ) -> torch.Tensor:
        """weight * kd_loss(student, teacher(inputs)) while active(step), else 0 (no teacher forward)."""
        if not self.active(step):
            return student_logits.new_zeros((), dtype=torch.float32)
        teacher = self.teacher_logits(*inputs, **kwargs)
        return self.config.weight * kd_loss(student_logits, teacher, self.config.temperature, mask)
