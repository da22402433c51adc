"""Deferred batch norm: BatchNorm whose running statistics are those of the whole batch.

In a pipeline each micro-batch goes through a BatchNorm layer on its own, so a plain BatchNorm normalises
with the micro-batch's statistics (unavoidable: whole-batch statistics would need every micro-batch before
any output) and also updates its running statistics once per micro-batch, from micro-batch statistics.
:class:`DeferredBatchNorm` keeps the first and fixes the second: in training mode it gathers the
statistics of every micro-batch of the step and :meth:`DeferredBatchNorm.commit` (called once per
optimizer step) updates ``running_mean``, ``running_var`` and ``num_batches_tracked`` once, with the
whole batch's mean and unbiased variance, as a BatchNorm fed the whole batch would. The idea is
torchgpipe's deferred batch norm.

Parameter and buffer names are BatchNorm's, so state dicts load either way.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

__all__ = [
    "DeferredBatchNorm",
    "convert_deferred_batchnorm",
    "commit_deferred_batchnorm",
    "deferred_batchnorms",
]

_INPUT_DIMS: dict[type[nn.Module], tuple[int, ...]] = {
    nn.BatchNorm1d: (2, 3),
    nn.BatchNorm2d: (4,),
    nn.BatchNorm3d: (5,),
}
"""The BatchNorm classes :func:`convert_deferred_batchnorm` replaces, with the input ranks each accepts."""


class DeferredBatchNorm(_BatchNorm):
    """A BatchNorm that updates its running statistics once per :meth:`commit`, over all inputs since.

    Training mode normalises each input with its own statistics, exactly like BatchNorm, and adds the
    input's per-channel count, mean and sum of squared deviations to the pending statistics (detached,
    merged with Chan's parallel formula). Eval mode, and ``track_running_stats=False``, are BatchNorm's.

    Args:
        input_dims: the input ranks accepted (BatchNorm1d: ``(2, 3)``, 2d: ``(4,)``, 3d: ``(5,)``);
            ``None`` accepts any rank >= 2.
        The other arguments are BatchNorm's.
    """

    def __init__(
        self,
        num_features: int,
        eps: float = 1e-5,
        momentum: float | None = 0.1,
        affine: bool = True,
        track_running_stats: bool = True,
        input_dims: tuple[int, ...] | None = None,
        device=None,
        dtype=None,
    ) -> None:
        super().__init__(num_features, eps, momentum, affine, track_running_stats, device, dtype)
        self.input_dims = input_dims
        self._pending_count = 0
        self._pending_mean: torch.Tensor | None = None
        self._pending_m2: torch.Tensor | None = None

    @classmethod
    def from_batchnorm(cls, batchnorm: _BatchNorm) -> DeferredBatchNorm:
        """A DeferredBatchNorm holding ``batchnorm``'s own parameters and buffers (shared, not copied)."""
        deferred = cls(
            batchnorm.num_features,
            eps=batchnorm.eps,
            momentum=batchnorm.momentum,
            affine=batchnorm.affine,
            track_running_stats=batchnorm.track_running_stats,
            input_dims=_INPUT_DIMS.get(type(batchnorm)),
            device="meta",
        )
        for name in ("weight", "bias"):
            deferred.register_parameter(name, getattr(batchnorm, name))
        for name in ("running_mean", "running_var", "num_batches_tracked"):
            deferred.register_buffer(name, getattr(batchnorm, name))
        deferred.train(batchnorm.training)
        return deferred

    @property
    def pending_count(self) -> int:
        """Samples per channel gathered since the last :meth:`commit`."""
        return self._pending_count

    def _check_input_dim(self, input: torch.Tensor) -> None:
        if self.input_dims is None:
            if input.dim() < 2:
                raise ValueError(f"expected at least 2D input (got {input.dim()}D input)")
        elif input.dim() not in self.input_dims:
            expected = " or ".join(f"{dims}D" for dims in self.input_dims)
            raise ValueError(f"expected {expected} input (got {input.dim()}D input)")

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        """Normalise ``input``; in training mode, also gather its statistics for :meth:`commit`."""
        if not (self.training and self.track_running_stats):
            return super().forward(input)
        self._check_input_dim(input)
        mean = torch.zeros_like(self.running_mean)
        var = torch.zeros_like(self.running_var)
        output = F.batch_norm(input, mean, var, self.weight, self.bias, True, 1.0, self.eps)
        if not _recomputing():
            self._gather(mean, var, input.numel() // input.shape[1])
        return output

    def _gather(self, mean: torch.Tensor, unbiased_var: torch.Tensor, count: int) -> None:
        """Merge one input's per-channel statistics into the pending ones."""
        m2 = unbiased_var * (count - 1)
        if self._pending_mean is None:
            self._pending_count, self._pending_mean, self._pending_m2 = count, mean, m2
            return
        total = self._pending_count + count
        delta = mean - self._pending_mean
        self._pending_mean = self._pending_mean + delta * (count / total)
        self._pending_m2 = self._pending_m2 + m2 + delta.square() * (self._pending_count * count / total)
        self._pending_count = total

    def commit(self) -> None:
        """Update the running statistics once with everything gathered since the last commit, then reset.

        Does nothing when nothing was gathered (eval mode, or no forward since the last commit).
        """
        if self._pending_mean is None:
            return
        with torch.no_grad():
            self.num_batches_tracked.add_(1)
            factor = 1.0 / float(self.num_batches_tracked) if self.momentum is None else self.momentum
            unbiased_var = self._pending_m2 / (self._pending_count - 1)
            _blend(self.running_mean, self._pending_mean, factor)
            _blend(self.running_var, unbiased_var, factor)
        self._pending_count, self._pending_mean, self._pending_m2 = 0, None, None


def convert_deferred_batchnorm(module: nn.Module) -> nn.Module:
    """Replace every plain ``nn.BatchNorm1d/2d/3d`` (tracking running statistics) by a DeferredBatchNorm.

    The replacements hold the replaced modules' parameters and buffers, so names, values and any
    optimizer's references stay valid. Subclasses (``SyncBatchNorm``, lazy or user BatchNorms) and
    BatchNorms with ``track_running_stats=False`` are left as they are. Converts ``module`` in place
    and returns it, or returns the replacement when ``module`` itself is a BatchNorm.
    """
    if _convertible(module):
        return DeferredBatchNorm.from_batchnorm(module)
    for name, child in module.named_children():
        converted = convert_deferred_batchnorm(child)
        if converted is not child:
            setattr(module, name, converted)
    return module


def deferred_batchnorms(module: nn.Module) -> list[DeferredBatchNorm]:
    """The DeferredBatchNorm modules in ``module`` (itself included)."""
    return [sub for sub in module.modules() if isinstance(sub, DeferredBatchNorm)]


def commit_deferred_batchnorm(module: nn.Module) -> None:
    """:meth:`DeferredBatchNorm.commit` every DeferredBatchNorm in ``module``: once per optimizer step."""
    for batchnorm in deferred_batchnorms(module):
        batchnorm.commit()


def _blend(running: torch.Tensor, batch: torch.Tensor, factor: float) -> None:
    """``running = (1 - factor) * running + factor * batch`` in place, in BatchNorm's order of operations."""
    running.mul_(1.0 - factor).add_(batch.to(running.dtype), alpha=factor)


def _convertible(module: nn.Module) -> bool:
    return type(module) in _INPUT_DIMS and module.track_running_stats


def _recomputing() -> bool:
    """Whether this forward runs inside a backward pass (activation checkpointing recomputing it)."""
    return torch._C._current_graph_task_id() != -1
