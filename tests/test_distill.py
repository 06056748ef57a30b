"""moe.distill: the KD term (Megatron-DeepSpeed's MoS loss), its staging, and a teacher that is left untouched."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import moe
from moe.distill import DistillConfig, Distiller, kd_loss


def test_kd_loss_matches_megatron_deepspeed_formula() -> None:
    torch.manual_seed(0)
    b, s, v, t = 3, 5, 11, 2.0
    student, teacher = torch.randn(b, s, v), torch.randn(b, s, v)
    # calculate_mos_loss: T^2 * KLDivLoss(batchmean)(log_softmax(s/T), softmax(t/T)) / seq_length
    want = (
        t
        * t
        * nn.KLDivLoss(reduction="batchmean")(F.log_softmax(student / t, dim=2), F.softmax(teacher / t, dim=2))
        / s
    )
    torch.testing.assert_close(kd_loss(student, teacher, t), want)
    assert float(kd_loss(teacher, teacher, t)) == pytest.approx(0.0, abs=1e-6)


def test_kd_loss_gradient_and_mask() -> None:
    torch.manual_seed(0)
    student = torch.randn(4, 6, dtype=torch.float64, requires_grad=True)
    teacher = torch.randn(4, 6, dtype=torch.float64)
    # d/ds of KL(p_t || softmax(s)) per token = (softmax(s) - p_t) / tokens (T = 1)
    kd_loss(student, teacher).backward()
    want = (torch.softmax(student.detach(), -1) - torch.softmax(teacher, -1)) / 4
    torch.testing.assert_close(student.grad, want.float().double(), rtol=1e-5, atol=1e-6)
    mask = torch.tensor([True, False, True, False])
    torch.testing.assert_close(kd_loss(student, teacher, mask=mask), kd_loss(student[mask], teacher[mask]))
    assert float(kd_loss(student, teacher, mask=torch.zeros(4, dtype=torch.bool)).detach()) == 0.0
    with pytest.raises(ValueError, match="vocabulary"):
        kd_loss(student, teacher[:, :5])
    with pytest.raises(ValueError, match="mask must be bool"):
        kd_loss(student, teacher, mask=torch.ones(4))


def test_config_validation() -> None:
    for bad in (
        dict(weight=-1.0),
        dict(temperature=0.0),
        dict(temperature=float("inf")),
        dict(stop_step=-1),
        dict(stop_step=1.5),
    ):
        with pytest.raises(ValueError):
            DistillConfig(**bad)  # type: ignore[arg-type]


def test_staged_term_stops_and_leaves_the_teacher_alone() -> None:
    torch.manual_seed(0)
    teacher = nn.Sequential(nn.Linear(8, 8), moe.MoE(8, 16, 4, 2, router="aux_free"), nn.Linear(8, 5))
    teacher.train()
    bias_before = teacher[1].router.e_score_correction_bias.clone()
    student = nn.Linear(8, 5)
    distiller = Distiller(teacher, DistillConfig(weight=0.5, temperature=2.0, stop_step=3))
    assert not teacher.training and not any(p.requires_grad for p in teacher.parameters())
    x = torch.randn(6, 8)
    calls = []
    teacher.register_forward_hook(lambda *a: calls.append(1))
    terms = []
    for step in range(5):
        logits = student(x)
        term = distiller.term(step, logits, x)
        terms.append(float(term.detach()))
        if step < 3:
            term.backward()
            assert student.weight.grad is not None and student.weight.grad.abs().sum() > 0
            student.zero_grad()
    assert len(calls) == 3 and all(t > 0 for t in terms[:3]) and terms[3:] == [0.0, 0.0]
    torch.testing.assert_close(torch.tensor(terms[0]), 0.5 * kd_loss(student(x), teacher(x), 2.0).detach())
    moe.update_routers(teacher)  # eval-mode forwards counted no load: the bias does not move
    assert torch.equal(teacher[1].router.e_score_correction_bias, bias_before)
    assert all(p.grad is None for p in teacher.parameters())


def test_teacher_outputs_tuple_dict_and_custom_forward() -> None:
    logits = torch.randn(2, 3)

    class Tuple(nn.Module):
        def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            return logits, torch.zeros(())

    class Dict(nn.Module):
        def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
            return {"logits": logits}

    assert torch.equal(Distiller(Tuple()).teacher_logits(None), logits)
    assert torch.equal(Distiller(Dict()).teacher_logits(None), logits)
    assert torch.equal(Distiller(nn.Identity(), forward=lambda x: logits * 2).teacher_logits(None), logits * 2)
