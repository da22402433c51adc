"""Values crossing a stage boundary: any nesting of tuples, lists and dicts of tensors and constants.

A unit may return a tensor, or a structure such as ``(hidden, mask)`` or ``{"hidden": h, "depth": 3}``;
the next unit receives it as its one argument. The structure is a pytree (``torch.utils._pytree``: tuples,
lists, dicts, named tuples); its leaves are tensors, which are moved, detached and given gradients, and
constants (ints, strings, ``None``...), which travel unchanged. Only floating-point tensor leaves carry
gradients. A gradient structure mirrors the value it belongs to, with ``None`` for leaves without one.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import torch
import torch.utils._pytree as pytree

__all__ = [
    "map_tensors",
    "map_leaves",
    "tensor_leaves",
    "detach",
    "to_device",
    "to_cpu",
    "detach_for_grad",
    "requires_grad",
    "backward_pairs",
    "input_grads",
    "hidden_tensor_leaf",
    "batch_size",
    "split",
]


def _is_leaf(value: Any) -> bool:
    """``None`` is a leaf (older torch versions flatten it to nothing, which would misalign gradients)."""
    return value is None


def _flatten(value: Any) -> tuple[list[Any], pytree.TreeSpec]:
    return pytree.tree_flatten(value, is_leaf=_is_leaf)


def map_tensors(fn: Callable[[torch.Tensor], Any], value: Any) -> Any:
    """``value`` with ``fn`` applied to every tensor leaf; other leaves unchanged."""
    return map_leaves(lambda leaf: fn(leaf) if torch.is_tensor(leaf) else leaf, value)


def map_leaves(fn: Callable[[Any], Any], value: Any) -> Any:
    """``value`` with ``fn`` applied to every leaf (tensors and constants), in flattening order."""
    return pytree.tree_map(fn, value, is_leaf=_is_leaf)


def tensor_leaves(value: Any) -> list[torch.Tensor]:
    """The tensor leaves of ``value``, in flattening order."""
    return [leaf for leaf in _flatten(value)[0] if torch.is_tensor(leaf)]


def detach(value: Any) -> Any:
    """``value`` with every tensor leaf detached from the autograd graph."""
    return map_tensors(torch.Tensor.detach, value)


def to_device(value: Any, device: torch.device | str, non_blocking: bool = False) -> Any:
    """``value`` with every tensor leaf on ``device``."""
    return map_tensors(lambda tensor: tensor.to(device, non_blocking=non_blocking), value)


def to_cpu(value: Any) -> Any:
    """A detached copy of ``value`` with every tensor leaf on the CPU (for sending to another process)."""
    return map_tensors(lambda tensor: tensor.detach().cpu(), value)


def detach_for_grad(value: Any) -> Any:
    """``value`` with tensor leaves detached, floating-point ones as new leaves that require grad."""

    def _leaf(tensor: torch.Tensor) -> torch.Tensor:
        tensor = tensor.detach()
        return tensor.requires_grad_(True) if tensor.is_floating_point() else tensor

    return map_tensors(_leaf, value)


def requires_grad(value: Any) -> bool:
    """Whether any tensor leaf of ``value`` requires grad."""
    return any(tensor.requires_grad for tensor in tensor_leaves(value))


def backward_pairs(output: Any, grad_output: Any) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """The ``(tensors, grad_tensors)`` to pass to ``torch.autograd.backward`` for ``output``.

    ``grad_output`` mirrors ``output``; a pair is kept where the output leaf is a tensor that requires
    grad and its gradient is not ``None``. Raises ``RuntimeError`` when the two structures differ.
    """
    outputs, output_spec = _flatten(output)
    grads, grad_spec = _flatten(grad_output)
    if output_spec != grad_spec:
        raise RuntimeError(
            f"the gradient structure {grad_spec} does not mirror the output structure {output_spec}"
        )
    pairs = [
        (out, grad)
        for out, grad in zip(outputs, grads, strict=True)
        if torch.is_tensor(out) and out.requires_grad and grad is not None
    ]
    return [out for out, _ in pairs], [grad for _, grad in pairs]


def input_grads(value: Any) -> Any:
    """A structure mirroring ``value``: each leaf's ``.grad`` where it requires grad, ``None`` elsewhere."""
    return pytree.tree_map(
        lambda leaf: leaf.grad if torch.is_tensor(leaf) and leaf.requires_grad else None,
        value,
        is_leaf=_is_leaf,
    )


def hidden_tensor_leaf(value: Any) -> Any | None:
    """The first non-tensor leaf of ``value`` that holds tensors itself (a dataclass, an object), if any.

    Such a leaf is opaque to the structure: its tensors would be neither moved nor given gradients.
    """
    for leaf in _flatten(value)[0]:
        if torch.is_tensor(leaf) or leaf is None:
            continue
        if dataclasses.is_dataclass(leaf) and not isinstance(leaf, type):
            fields = [getattr(leaf, field.name) for field in dataclasses.fields(leaf)]
        else:
            fields = list(getattr(leaf, "__dict__", {}).values())
        if any(torch.is_tensor(field) for field in fields):
            return leaf
    return None


def batch_size(value: Any) -> int:
    """The common size of dimension 0 of the tensor leaves of ``value``.

    Raises ``ValueError`` (naming ``data``) when there is no tensor leaf with a dimension 0, or the
    tensor leaves disagree.
    """
    tensors = tensor_leaves(value)
    if not tensors or any(tensor.dim() == 0 for tensor in tensors):
        raise ValueError(
            "data: every tensor in a batch needs a batch dimension (dimension 0), and a batch needs at "
            f"least one tensor; got {_describe(value)}"
        )
    sizes = {tensor.shape[0] for tensor in tensors}
    if len(sizes) != 1:
        raise ValueError(
            f"data: the tensors of a batch have different sizes along dimension 0 ({sorted(sizes)}) in "
            f"{_describe(value)}; make every tensor of a sample part of the same batch dimension"
        )
    return sizes.pop()


def split(value: Any, num_chunks: int) -> list[Any]:
    """``num_chunks`` structures like ``value``, each tensor leaf chunked along dimension 0.

    Constants are repeated in every chunk. The size of dimension 0 must be a multiple of ``num_chunks``.
    """
    size = batch_size(value)
    assert size % num_chunks == 0, (size, num_chunks)
    leaves, spec = _flatten(value)
    chunked = [leaf.chunk(num_chunks) if torch.is_tensor(leaf) else [leaf] * num_chunks for leaf in leaves]
    return [pytree.tree_unflatten([pieces[idx] for pieces in chunked], spec) for idx in range(num_chunks)]


def _describe(value: Any) -> str:
    """The structure of ``value`` with tensors shown by shape and dtype."""
    shown = map_tensors(lambda tensor: f"Tensor{tuple(tensor.shape)}:{tensor.dtype}", value)
    return repr(shown)
