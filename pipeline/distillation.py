"""Knowledge distillation while fine-tuning a pruned network (`finetune.distill`): the unpruned baseline is
the teacher.

loss = task loss + alpha x distillation loss on the logits (+ feature_weight x feature loss).
- `kl`: the pixel-wise KL divergence between the teacher's and the student's sigmoid probabilities at
  temperature T, times T² (Hinton et al.'s scaling, so alpha means the same at any T); each pixel and
  class is a Bernoulli, as the networks' sigmoid outputs are.
- `mse`: the mean squared difference of the logits.
- features (`feature_weight` > 0): the mean squared difference between the decoder outputs (the input of
  each network's segmentation head), the student's mapped to the teacher's width by a 1x1 convolution
  trained with it and discarded afterwards (pruning narrowed the student's decoder).
The teacher runs in inference mode, in eval mode, without gradients; its time and memory are measured.
Written here because no maintained library offers distillation for segmentation logits over a training
loop like this one (torchdistill and similar wrap whole training frameworks).
"""
from __future__ import annotations

import time
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from pipeline.enums import ConfigEnum


class DistillLoss(ConfigEnum):
    """finetune.distill.loss: the distillation term on the logits (the schema's type, so a wrong value fails at compose time)."""

    kl = "kl"  # pixel-wise sigmoid KL x T^2
    mse = "mse"  # MSE on the logits


LOSSES = tuple(m.value for m in DistillLoss)
HEAD = "segmentation_head"


def sigmoid_kl(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """Mean over pixels of KL(Bernoulli(teacher) || Bernoulli(student)) at temperature T, times T²."""
    t = temperature
    p = torch.sigmoid(teacher_logits / t)
    log_q, log_1mq = F.logsigmoid(student_logits / t), F.logsigmoid(-student_logits / t)
    log_p, log_1mp = F.logsigmoid(teacher_logits / t), F.logsigmoid(-teacher_logits / t)
    kl = p * (log_p - log_q) + (1 - p) * (log_1mp - log_1mq)
    return kl.mean() * t * t


class _HeadInput:
    """Keeps the last input of a network's segmentation head (its decoder output)."""

    def __init__(self, model: nn.Module):
        head = getattr(model, HEAD, None)
        if head is None:
            raise ValueError(f"feature distillation needs a `{HEAD}` module (every medprune model has one)")
        self.value: Optional[torch.Tensor] = None
        self.handle = head.register_forward_pre_hook(self._keep)

    def _keep(self, _module, args):
        self.value = args[0]

    def remove(self):
        self.handle.remove()


class Distiller:
    """The teacher and the distillation terms for one fine-tuning run (`loss(student, images, logits)`)."""

    def __init__(self, teacher: nn.Module, student: nn.Module, example: torch.Tensor, alpha: float,
                 temperature: float, loss: str, feature_weight: float):
        if loss not in LOSSES:
            raise ValueError(f"finetune.distill.loss={loss!r}: expected one of {', '.join(LOSSES)}")
        self.teacher = teacher.eval()
        for p in self.teacher.parameters():
            p.requires_grad_(False)
        self.alpha, self.temperature, self.kind, self.feature_weight = alpha, temperature, loss, feature_weight
        self.teacher_seconds = 0.0
        self.adapter: Optional[nn.Module] = None
        self._student_head = self._teacher_head = None
        if feature_weight > 0:
            self._student_head, self._teacher_head = _HeadInput(student), _HeadInput(self.teacher)
            device = next(student.parameters()).device
            with torch.no_grad():
                student.eval()(example.to(device))
                self.teacher(example.to(device))
            c_student, c_teacher = self._student_head.value.shape[1], self._teacher_head.value.shape[1]
            conv = nn.Conv3d if self._student_head.value.dim() == 5 else nn.Conv2d  # a 3D network's features are volumes
            self.adapter = conv(c_student, c_teacher, 1, bias=False).to(device) if c_student != c_teacher else nn.Identity()

    @property
    def teacher_mb(self) -> float:
        return sum(p.numel() * p.element_size() for p in self.teacher.parameters()) / 1e6

    def loss(self, images: torch.Tensor, student_logits: torch.Tensor) -> torch.Tensor:
        """The distillation terms for one batch (the student has just run forward on `images`)."""
        start = time.perf_counter()
        with torch.inference_mode():
            teacher_logits = self.teacher(images).float()
            teacher_features = self._teacher_head.value.float() if self._teacher_head else None
        if images.device.type == "cuda":
            torch.cuda.synchronize(images.device)
        self.teacher_seconds += time.perf_counter() - start
        teacher_logits = teacher_logits.clone()  # inference tensors cannot enter autograd
        if self.kind == "kl":
            term = sigmoid_kl(student_logits.float(), teacher_logits, self.temperature)
        else:
            term = F.mse_loss(student_logits.float(), teacher_logits)
        total = self.alpha * term
        if self.adapter is not None:
            mapped = self.adapter(self._student_head.value.float())
            total = total + self.feature_weight * F.mse_loss(mapped, teacher_features.clone())
        return total

    def close(self) -> None:
        for hook in (self._student_head, self._teacher_head):
            if hook is not None:
                hook.remove()
