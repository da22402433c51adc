"""Parameter gradients of common junction nodes, computed from their saved tensors without the graph.

A *junction* (see :mod:`pipetrain.split_backward`) is a node of a stage's autograd graph where parameters
hang off the activation path. For the junctions that make up most models (a linear layer with or without
bias, a layer norm), the parameter gradients need only the gradient flowing into the node and one or
three tensors the node saved in the forward. A :class:`WeightRule` names those tensors and computes the
gradients from them. With a rule for every junction, the input gradient (``I``) can free the graph as it
goes, as a full backward does, keeping only those tensors for ``W``; and ``W`` runs a few tensor ops per
junction instead of re-entering autograd. The rules accumulate into ``.grad`` in place where autograd
would compute a gradient apart and then add it.

Each rule matches a node by its exact structure (node type, and edges that lead straight to the given
parameters), so a node that merely looks alike (a linear layer whose weight is cast first, under autocast)
gets no rule and is handled by autograd.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Protocol

import torch

__all__ = ["LayerNormRule", "LinearRule", "WeightRule", "accumulate_grad", "rule_for"]


class WeightRule(Protocol):
    """The parameter gradients of one junction node, from its incoming gradient and saved tensors."""

    def saved(self, node: Any) -> tuple[torch.Tensor, ...]:
        """The tensors ``node`` saved that :meth:`accumulate` needs (read before the graph is freed)."""

    def accumulate(self, grad: torch.Tensor, saved: tuple[torch.Tensor, ...]) -> None:
        """Add the parameters' gradients for the node's incoming ``grad`` into their ``.grad``."""


def accumulate_grad(parameter: torch.nn.Parameter, grad: torch.Tensor) -> None:
    """Add ``grad`` into ``parameter.grad`` (taking it as the gradient when there is none yet)."""
    if parameter.grad is None:
        parameter.grad = grad
    else:
        parameter.grad += grad


def _parameter_of(edge: tuple[Any, int]) -> torch.nn.Parameter | None:
    """The parameter whose gradient-accumulating node ``edge`` leads to, if it does."""
    return getattr(edge[0], "variable", None)  # only a leaf's AccumulateGrad node has one


def _transposed_parameter(edge: tuple[Any, int]) -> torch.nn.Parameter | None:
    """The parameter ``p`` when ``edge`` leads to ``p.t()`` (a linear layer's weight as ``addmm`` uses it)."""
    node = edge[0]
    if node is None or node.name() != "TBackward0":
        return None
    return _parameter_of(node.next_functions[0])


def _same(found: list[torch.nn.Parameter | None], parameters: list[torch.nn.Parameter]) -> bool:
    """Whether ``found`` (``None`` for an absent one) are exactly ``parameters``, in any order."""
    present = [p for p in found if p is not None]
    return len(present) == len(parameters) and {id(p) for p in present} == {id(p) for p in parameters}


@dataclass(frozen=True, eq=False)  # compared by identity: its fields are parameters
class LinearRule:
    """``y = x @ W.T (+ b)`` on a 2-D ``x`` (``addmm`` with a bias, ``mm`` without; a linear layer on a
    3-D input runs on its 2-D view): ``W.grad += grad.T @ x`` as one ``addmm_``, ``b.grad += grad.sum(0)``.
    """

    weight: torch.nn.Parameter
    bias: torch.nn.Parameter | None

    @classmethod
    def match(cls, node: Any, parameters: list[torch.nn.Parameter]) -> LinearRule | None:
        """The rule for ``node`` when it is a linear layer's product with exactly ``parameters``."""
        if node.name() == "AddmmBackward0":
            bias_edge, _, weight_edge = node.next_functions
            weight, bias = _transposed_parameter(weight_edge), _parameter_of(bias_edge)
            if bias is None or bias.dim() != 1 or node._saved_alpha != 1 or node._saved_beta != 1:
                return None
        elif node.name() == "MmBackward0":
            weight, bias = _transposed_parameter(node.next_functions[1]), None
        else:
            return None
        if weight is None or weight.dim() != 2 or not _same([weight, bias], parameters):
            return None
        return cls(weight, bias)

    def saved(self, node: Any) -> tuple[torch.Tensor, ...]:
        """The layer's 2-D input."""
        return (node._saved_mat1 if self.bias is not None else node._saved_self,)

    def accumulate(self, grad: torch.Tensor, saved: tuple[torch.Tensor, ...]) -> None:
        """``W.grad += grad.T @ x`` in place (one pass over ``W.grad``), ``b.grad += grad.sum(0)``."""
        (layer_input,) = saved
        if self.weight.grad is None:
            self.weight.grad = grad.t().mm(layer_input)
        else:
            self.weight.grad.addmm_(grad.t(), layer_input)
        if self.bias is not None:
            accumulate_grad(self.bias, grad.sum(0))


@dataclass(frozen=True, eq=False)  # compared by identity: its fields are parameters
class LayerNormRule:
    """Layer norm's affine parameters, from the normalized statistics it saved (one kernel call, asked
    for the weight and bias gradients only, as autograd would ask it)."""

    weight: torch.nn.Parameter
    bias: torch.nn.Parameter | None

    @classmethod
    def match(cls, node: Any, parameters: list[torch.nn.Parameter]) -> LayerNormRule | None:
        """The rule for ``node`` when it is a layer norm with exactly ``parameters`` as weight (and bias)."""
        if node.name() != "NativeLayerNormBackward0":
            return None
        _, weight_edge, bias_edge = node.next_functions
        weight, bias = _parameter_of(weight_edge), _parameter_of(bias_edge)
        if weight is None or not _same([weight, bias], parameters):
            return None
        return cls(weight, bias)

    def saved(self, node: Any) -> tuple[torch.Tensor, ...]:
        """The layer's input, and the mean and reciprocal standard deviation it computed."""
        return node._saved_input, node._saved_result1, node._saved_result2

    def accumulate(self, grad: torch.Tensor, saved: tuple[torch.Tensor, ...]) -> None:
        """Add the weight and bias gradients of the layer norm for ``grad``."""
        layer_input, mean, rstd = saved
        _, weight_grad, bias_grad = torch.ops.aten.native_layer_norm_backward(
            grad,
            layer_input,
            self.weight.shape,
            mean,
            rstd,
            self.weight,
            self.bias,
            [False, True, self.bias is not None],
        )
        accumulate_grad(self.weight, weight_grad)
        if self.bias is not None:
            accumulate_grad(self.bias, bias_grad)


_RULES = (LinearRule, LayerNormRule)


def rule_for(node: Any, parameters: list[torch.nn.Parameter]) -> WeightRule | None:
    """The rule computing ``parameters``' gradients at junction ``node``; ``None`` where none applies."""
    for rule in _RULES:
        matched = rule.match(node, parameters)
        if matched is not None:
            return matched
    return None
