"""One stage of the pipeline on one device: forward and backward per micro-batch, its own optimizer.

A :class:`Stage` keeps, for every micro-batch it has run forward and not yet backward, the input it
received (its floating-point tensors as leaves that require grad) and the output it produced (the scaled
loss on the last stage). ``backward(mb, grad_output)`` runs autograd from that output and returns the
gradient of the input, so gradients of all micro-batches accumulate in ``.grad`` and one ``step()`` equals
one optimizer step on the whole batch. Zero-bubble schedules run that backward in two halves:
``backward_input(mb, grad_output)`` returns the input's gradient and keeps the graph and the gradients
reaching the parameters' uses, and ``backward_weight(mb)`` accumulates the parameter gradients later
(:mod:`pipetrain.split_backward`); together they cost about one ``backward``. What ``backward_input``
keeps counts as activation memory until ``backward_weight`` releases it. The bytes autograd saves for a
micro-batch's backward are counted by a hook on every saved tensor, once per step for each input layout
(shapes, dtypes): the step's other micro-batches of that layout are taken to save as much, which is exact
for a module whose saved tensors' sizes follow from its input's, and spares them a Python call per saved
tensor (3-4% of a GPT stage's forward and backward). Inputs, outputs and gradients may
be tensors or any nesting of tuples, lists and dicts of tensors and constants (:mod:`pipetrain.boundary`).
A stage without parameters has no optimizer. The stage knows nothing about transports or schedules: the
caller orders the actions.
"""

from __future__ import annotations

import logging
import math
import time
import warnings
from collections.abc import Callable, Collection, Iterable
from contextlib import nullcontext
from typing import Any

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from pipetrain import boundary
from pipetrain.losses import LossFn
from pipetrain.schedule import Action, ActionKind
from pipetrain.split_backward import PendingWeightGrad, UnsplittableBackward, input_grad, weight_grad
from pipetrain.timings import Span, SpanCategory, StageReport

__all__ = ["PRECISIONS", "OptimizerFactory", "LrSchedulerFactory", "Stage"]

PRECISIONS: dict[str, torch.dtype | None] = {"fp32": None, "bf16": torch.bfloat16}
"""``precision`` values -> the autocast dtype of the forward (``None``: none, float32 throughout)."""

OptimizerFactory = Callable[[Iterable[nn.Parameter]], torch.optim.Optimizer]
LrSchedulerFactory = Callable[[torch.optim.Optimizer], torch.optim.lr_scheduler.LRScheduler]

_log = logging.getLogger(__name__)


class Stage:
    """Stage ``stage_idx`` of ``num_stages``, holding ``module`` on ``device``.

    Args:
        module: the stage's units (moved to ``device``).
        optimizer_factory: called with the stage's parameters, e.g. ``partial(torch.optim.SGD, lr=0.1)``;
            not called for a stage without parameters (its ``optimizer`` is ``None``).
        loss_fn: the loss, used by the last stage only.
        loss_scale: factor on each micro-batch loss, ``1 / num_microbatches``, so the micro-batch losses
            sum to the batch's mean loss and accumulated gradients equal the whole batch's.
        stop_on_nan: raise ``FloatingPointError`` when a micro-batch loss is not finite.
        recompute_microbatches: micro-batches whose forward keeps no activations but the stage's input
            and runs again in backward (non-reentrant ``torch.utils.checkpoint`` over the whole stage).
        precision: ``fp32``, or ``bf16``: forward under ``torch.autocast`` to bfloat16 (parameters and
            optimizer state stay float32), and floating-point outputs and input gradients leave the
            stage in bfloat16 (half the bytes between workers).
        lr_scheduler_factory: called with the stage's optimizer, e.g.
            ``partial(torch.optim.lr_scheduler.CosineAnnealingLR, T_max=100)``; the scheduler steps once
            after every optimizer step. ``None``: the learning rate stays as the optimizer was built.
    """

    def __init__(
        self,
        stage_idx: int,
        num_stages: int,
        module: nn.Module,
        device: torch.device,
        optimizer_factory: OptimizerFactory,
        loss_fn: LossFn,
        loss_scale: float,
        stop_on_nan: bool = True,
        lr_scheduler_factory: LrSchedulerFactory | None = None,
        recompute_microbatches: Collection[int] = (),
        precision: str = "fp32",
    ) -> None:
        self.stage_idx = stage_idx
        self.num_stages = num_stages
        self.device = torch.device(device)
        self.module = module.to(self.device)
        parameters = list(self.module.parameters())
        self.optimizer = optimizer_factory(parameters) if parameters else None
        self.lr_scheduler = (
            lr_scheduler_factory(self.optimizer)
            if lr_scheduler_factory is not None and self.optimizer is not None
            else None
        )
        self._loss_fn = loss_fn
        self._recompute = frozenset(recompute_microbatches)
        if precision not in PRECISIONS:
            raise ValueError(f"precision: {precision!r} is not one of {list(PRECISIONS)}")
        self._low_precision = PRECISIONS[precision]
        self._sent_bytes = 0
        self._loss_scale = loss_scale
        self._stop_on_nan = stop_on_nan
        self._inputs: dict[int, Any] = {}
        self._outputs: dict[int, Any] = {}
        self._losses: dict[int, float] = {}
        self._correct = 0
        self._predictions = 0
        self._spans: list[Span] = []
        self._saved_bytes: dict[int, int] = {}
        self._saved_per_layout: dict[tuple[Any, ...], int] = {}
        """Bytes autograd saved for the step's first micro-batch of each input layout (shapes, dtypes,
        recomputed or not): counted by a hook on every saved tensor once, taken for the rest."""
        self._held_bytes = 0
        self._peak_saved_bytes = 0
        self._parameter_storages = {p.untyped_storage().data_ptr() for p in self.module.parameters()}
        self._pending_weight_grads: dict[int, PendingWeightGrad] = {}
        self._split_refused: str | None = None

    @property
    def is_last(self) -> bool:
        """Whether this stage computes the loss."""
        return self.stage_idx == self.num_stages - 1

    def forward(self, mb_idx: int, inputs: Any, target: Any | None = None) -> Any:
        """Run micro-batch ``mb_idx`` forward; return the (detached) output, or the loss on the last stage."""
        if mb_idx in self._outputs:
            raise RuntimeError(f"stage {self.stage_idx}: micro-batch {mb_idx} was already run forward")
        if self.is_last and target is None:
            raise RuntimeError(
                f"stage {self.stage_idx}: the last stage needs the target of micro-batch {mb_idx}"
            )
        start = time.time()
        x = boundary.to_device(inputs, self.device, non_blocking=True)
        if self.stage_idx > 0:
            x = boundary.detach_for_grad(x)
        recomputed = mb_idx in self._recompute
        layout = (recomputed, *((t.shape, t.dtype) for t in boundary.tensor_leaves(x)))
        counted = self._saved_per_layout.get(layout)
        saved = [0]
        counting = (
            torch.autograd.graph.saved_tensors_hooks(
                _counting_pack(saved, self._parameter_storages), _identity
            )
            if counted is None
            else nullcontext()
        )
        with counting, self._autocast():
            if recomputed:
                output = checkpoint(self.module, x, use_reentrant=False)
                # What autograd keeps inside is recomputed; the checkpoint holds on to the input for it.
                saved[0] += sum(t.numel() * t.element_size() for t in boundary.tensor_leaves(x))
            else:
                output = self.module(x)
        if counted is None:
            self._saved_per_layout[layout] = saved[0]
        else:
            saved[0] = counted
        if self.is_last:
            target = boundary.to_device(target, self.device, non_blocking=True)
            with self._autocast():
                loss = self._loss_fn(output, target) * self._loss_scale
            loss_value = loss.item()
            if self._stop_on_nan and not math.isfinite(loss_value):
                raise FloatingPointError(
                    f"stage {self.stage_idx}: loss of micro-batch {mb_idx} is {loss_value}; "
                    "lower optim.lr or set train.stop_on_nan=false to continue anyway"
                )
            self._losses[mb_idx] = loss_value
            output = loss
        else:
            self._check_output(mb_idx, output)
        self._inputs[mb_idx] = x
        self._outputs[mb_idx] = output
        self._saved_bytes[mb_idx] = saved[0]
        self._held_bytes += saved[0]
        self._peak_saved_bytes = max(self._peak_saved_bytes, self._held_bytes)
        self._record(Action(self.stage_idx, ActionKind.FORWARD, mb_idx), start)
        return boundary.detach(output) if self.is_last else self._outgoing(boundary.detach(output))

    def evaluate(self, mb_idx: int, inputs: Any, target: Any | None = None) -> Any:
        """Run micro-batch ``mb_idx`` forward for evaluation: eval mode, no autograd, nothing kept.

        Returns the output (on the last stage: the scaled loss, which is also recorded, with the count of
        correct predictions when the loss is a classification). Collect with :meth:`evaluation_report`.
        """
        x = boundary.to_device(inputs, self.device, non_blocking=True)
        was_training = self.module.training
        self.module.eval()
        try:
            with torch.no_grad(), self._autocast():
                output = self.module(x)
                if not self.is_last:
                    return self._outgoing(output)
                target = boundary.to_device(target, self.device, non_blocking=True)
                loss = self._loss_fn(output, target) * self._loss_scale
                self._losses[mb_idx] = loss.item()
                if _is_class_prediction(output, target):
                    self._correct += int((output.argmax(dim=-1) == target).sum())
                    self._predictions += target.numel()
                return loss
        finally:
            self.module.train(was_training)

    def evaluation_report(self) -> StageReport:
        """The losses and prediction counts of the evaluation micro-batches run since the last report."""
        report = StageReport(
            stage_idx=self.stage_idx,
            spans=(),
            losses=tuple(self._losses[mb] for mb in sorted(self._losses)),
            correct=self._correct,
            predictions=self._predictions,
        )
        self._losses.clear()
        self._correct = self._predictions = 0
        return report

    def backward(self, mb_idx: int, grad_output: Any | None = None) -> Any | None:
        """Run micro-batch ``mb_idx`` backward; return the gradient of its input (``None`` on stage 0).

        ``grad_output`` mirrors the output (``None`` where an output leaf has no gradient); the returned
        gradient mirrors the input, with ``None`` for leaves that do not require grad.
        """
        start = time.time()
        x, tensors, grads = self._take_backward(mb_idx, grad_output)
        self._release(mb_idx)
        if tensors:
            torch.autograd.backward(tensors, grads)
        grad_input = boundary.input_grads(x) if self.stage_idx > 0 else None
        self._record(Action(self.stage_idx, ActionKind.BACKWARD, mb_idx), start)
        return self._outgoing(grad_input)

    def backward_input(self, mb_idx: int, grad_output: Any | None = None) -> Any | None:
        """The first half of micro-batch ``mb_idx``'s backward (``I``): return the gradient of its input.

        Like :meth:`backward`, but the parameter gradients wait for :meth:`backward_weight`; what they
        need is kept (and counted as activation memory) until then: the gradients reaching the
        parameters' uses, and the tensors those uses saved (linear layers, layer norms) or else the whole
        graph. Where the graph cannot be split, this runs the full backward (logged once per stage) and
        :meth:`backward_weight` has nothing left to do.
        """
        start = time.time()
        x, tensors, grads = self._take_backward(mb_idx, grad_output)
        leaves = [t for t in boundary.tensor_leaves(x) if t.requires_grad] if self.stage_idx > 0 else []
        pending = PendingWeightGrad()
        if tensors and self._split_refused is None:
            try:
                results, pending = input_grad(
                    tensors,
                    grads,
                    leaves,
                    list(self.module.named_parameters()),
                    keep_graph=mb_idx in self._recompute,
                )
            except UnsplittableBackward as error:
                self._split_refused = str(error)
                _log.warning(
                    "stage %d: the backward cannot be split into input and weight gradients (%s); this stage "
                    "runs the full backward in its I actions and nothing in its W actions",
                    self.stage_idx,
                    error,
                )
            else:
                for leaf, grad in zip(leaves, results, strict=True):
                    leaf.grad = grad
        self._pending_weight_grads[mb_idx] = pending
        if tensors and self._split_refused is not None:
            torch.autograd.backward(tensors, grads)
            self._release(mb_idx)
        else:
            if not pending.keeps_graph:
                self._release(mb_idx)  # the graph is gone; what W needs of it is counted below
            held = pending.held_bytes(self._parameter_storages)
            self._saved_bytes[mb_idx] = self._saved_bytes.get(mb_idx, 0) + held
            self._held_bytes += held
            self._peak_saved_bytes = max(self._peak_saved_bytes, self._held_bytes)
        grad_input = boundary.input_grads(x) if self.stage_idx > 0 else None
        self._record(Action(self.stage_idx, ActionKind.INPUT_GRAD, mb_idx), start)
        return self._outgoing(grad_input)

    def backward_weight(self, mb_idx: int) -> None:
        """The second half of micro-batch ``mb_idx``'s backward (``W``): accumulate its parameter gradients
        into ``.grad`` and release what :meth:`backward_input` kept."""
        start = time.time()
        pending = self._pending_weight_grads.pop(mb_idx, None)
        if pending is None:
            raise RuntimeError(
                f"stage {self.stage_idx}: weight gradient of micro-batch {mb_idx} before its input gradient"
            )
        weight_grad(pending)
        self._release(mb_idx)
        self._record(Action(self.stage_idx, ActionKind.WEIGHT_GRAD, mb_idx), start)

    def _take_backward(self, mb_idx: int, grad_output: Any | None) -> tuple[Any, list, list]:
        """Pop micro-batch ``mb_idx``'s input and output; the input and the backward's (tensors, grads)."""
        if mb_idx not in self._outputs:
            raise RuntimeError(f"stage {self.stage_idx}: backward of micro-batch {mb_idx} before its forward")
        output = self._outputs[mb_idx]
        if not self.is_last and grad_output is None and boundary.requires_grad(output):
            raise RuntimeError(f"stage {self.stage_idx}: backward of micro-batch {mb_idx} needs a gradient")
        del self._outputs[mb_idx]
        x = self._inputs.pop(mb_idx)
        if self.is_last:
            tensors, grads = ([output], [None]) if output.requires_grad else ([], [])
        else:
            grad = boundary.to_device(grad_output, self.device, non_blocking=True)
            tensors, grads = boundary.backward_pairs(output, grad)
            grads = [g.to(t.dtype) for t, g in zip(tensors, grads, strict=True)]  # bf16 on the wire
        return x, tensors, grads

    def _release(self, mb_idx: int) -> None:
        """Micro-batch ``mb_idx`` no longer holds activation memory."""
        self._held_bytes -= self._saved_bytes.pop(mb_idx, 0)

    def gradient_norms(self) -> list[float]:
        """The 2-norm of each parameter's accumulated gradient (parameters without one are left out).

        In parameter order, so the norms of all stages in stage order are those of the unsplit model's
        parameters, as :func:`torch.nn.utils.clip_grad_norm_` computes them.
        """
        grads = [p.grad for p in self.module.parameters() if p.grad is not None]
        return [float(norm) for norm in torch._foreach_norm(grads, 2)] if grads else []

    def step(self, grad_scale: float = 1.0, skip: bool = False) -> StageReport:
        """Step the optimizer on the accumulated gradients, reset them, and report the step's figures.

        ``grad_scale`` multiplies the gradients first (global norm clipping); with ``skip`` the gradients
        are dropped without an optimizer step (non-finite gradients somewhere in the pipeline). The
        learning-rate scheduler advances either way: it counts training steps.
        """
        if self._outputs or self._pending_weight_grads:
            waiting = sorted({*self._outputs, *self._pending_weight_grads})
            raise RuntimeError(
                f"stage {self.stage_idx}: optimizer step with micro-batches {waiting} "
                "still waiting for backward"
            )
        start = time.time()
        learning_rate = None
        if self.optimizer is not None:
            learning_rate = float(self.optimizer.param_groups[0]["lr"])
            if not skip:
                if grad_scale != 1.0:
                    grads = [p.grad for p in self.module.parameters() if p.grad is not None]
                    torch._foreach_mul_(grads, torch.tensor(grad_scale, dtype=torch.float32))
                self.optimizer.step()
            self.optimizer.zero_grad(set_to_none=True)
            if self.lr_scheduler is not None:
                with warnings.catch_warnings():  # a skipped step did not call optimizer.step(): intended
                    warnings.simplefilter("ignore", UserWarning)
                    self.lr_scheduler.step()
        self._spans.append(Span(self.stage_idx, SpanCategory.OPTIMIZER, "step", start, time.time()))
        peak_memory = None
        if self.device.type == "cuda":
            peak_memory = torch.cuda.max_memory_allocated(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
        report = StageReport(
            stage_idx=self.stage_idx,
            spans=tuple(self._spans),
            losses=tuple(self._losses[mb] for mb in sorted(self._losses)),
            peak_memory_bytes=peak_memory,
            peak_activation_bytes=self._peak_saved_bytes,
            learning_rate=learning_rate,
            sent_bytes=self._sent_bytes,
        )
        self._sent_bytes = 0
        self._spans.clear()
        self._losses.clear()
        self._peak_saved_bytes = 0
        self._saved_per_layout.clear()
        return report

    def advance_lr_scheduler(self, steps: int) -> None:
        """Move the learning-rate scheduler ``steps`` steps on, without training (a resumed run).

        Rebuilt from the config and replayed, the schedule is exactly where the interrupted run left it,
        and a schedule changed in the config applies from the resumed step on.
        """
        if self.lr_scheduler is None:
            return
        with warnings.catch_warnings():  # stepping before any optimizer step is the point here
            warnings.simplefilter("ignore", UserWarning)
            for _ in range(steps):
                self.lr_scheduler.step()

    def record_span(self, category: SpanCategory, name: str, start: float, end: float) -> None:
        """Record time a transport spent on this stage's behalf (waiting for or moving inputs)."""
        self._spans.append(Span(self.stage_idx, category, name, start, end))

    @property
    def microbatches_in_flight(self) -> int:
        """Micro-batches run forward whose backward has not run yet."""
        return len(self._outputs)

    def record_sent(self, num_bytes: int) -> None:
        """Count bytes of this stage's outputs or gradients that a transport sent to another worker."""
        self._sent_bytes += num_bytes

    def _autocast(self) -> Any:
        """The forward's autocast context (disabled in float32)."""
        dtype = self._low_precision
        return torch.autocast(self.device.type, dtype=dtype or torch.bfloat16, enabled=dtype is not None)

    def _outgoing(self, value: Any) -> Any:
        """``value`` as it leaves the stage: floating-point tensors in the low precision, if one is set."""
        dtype = self._low_precision
        if dtype is None or value is None:
            return value
        return boundary.map_tensors(lambda t: t.to(dtype) if t.is_floating_point() else t, value)

    def _check_output(self, mb_idx: int, output: Any) -> None:
        """Refuse an output whose tensors sit inside an object the boundary cannot see into."""
        hidden = boundary.hidden_tensor_leaf(output)
        if hidden is not None:
            kind = type(hidden).__name__
            raise ValueError(
                f"stage {self.stage_idx}: the output of micro-batch {mb_idx} holds a {kind} with tensors "
                f"inside, which would cross to the next stage without gradients; return the tensors in "
                f"tuples, lists or dicts (or register {kind} with torch.utils._pytree.register_pytree_node)"
            )

    def _record(self, action: Action, start: float) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        self._spans.append(Span(self.stage_idx, SpanCategory.COMPUTE, str(action), start, time.time()))


def _counting_pack(total: list[int], skip_storages: set[int]) -> Callable[[torch.Tensor], torch.Tensor]:
    """A saved-tensor hook adding the activation bytes autograd keeps for backward to ``total[0]``.

    Tensors sharing storage with a parameter (weights saved by every micro-batch) are not counted. The hook
    keeps a detached alias: handing back the tensor itself would make an output saved by its own node (a
    ReLU's) a reference cycle through C++ that Python's collector cannot free, so a graph whose saved
    tensors autograd never releases (``W`` runs only part of a graph that ``I`` retained) would leak.
    """

    def pack(tensor: torch.Tensor) -> torch.Tensor:
        if tensor.untyped_storage().data_ptr() not in skip_storages:
            total[0] += tensor.numel() * tensor.element_size()
        return tensor.detach()

    return pack


def _identity(tensor: torch.Tensor) -> torch.Tensor:
    return tensor


def _is_class_prediction(output: Any, target: Any) -> bool:
    """Whether ``output`` holds class scores for integer ``target``: ``(..., C)`` logits, ``(...)`` labels."""
    return (
        isinstance(output, torch.Tensor)
        and isinstance(target, torch.Tensor)
        and not target.is_floating_point()
        and output.dim() == target.dim() + 1
        and output.shape[:-1] == target.shape
    )
