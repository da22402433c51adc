"""Check that a model's ``forward`` is the chain of its units, so the pipeline trains the model as written.

Pipetrain never calls a model's ``forward``: it cuts the model into its units (top-level children in
registration order, a top-level ``nn.ModuleList`` expanded) and applies them one after another. A residual
connection written in ``forward``, children registered in another order than they are called, a child
never called or called twice, or an extra op such as a flatten in ``forward`` would make that chain a
different network. :func:`check_units_compose` runs both on a real sample and refuses any difference.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import nn
from torch.utils.data import Dataset

from pipetrain.build import build_model
from pipetrain.config import TrainConfig
from pipetrain.models import model_units, run_units

__all__ = ["check_model_composes", "check_units_compose"]

_RTOL = 1e-4
_ATOL = 1e-5
_NUM_SAMPLES = 2

_WHAT_RUNS = (
    "pipetrain trains the model's units applied one after another (its top-level children in registration "
    "order, a top-level ModuleList expanded: the names pipeline.stages lists), not its forward"
)
_MOVE_INTO_A_UNIT = (
    "move that computation into a unit module (e.g. an nn.Flatten() child, or a residual block module "
    "whose forward adds its own input), so that forward only calls the units in registration order"
)


def check_model_composes(cfg: TrainConfig, dataset: Dataset) -> None:
    """Build the model on the CPU from ``cfg.seed`` and check it on the dataset's first samples.

    Uses two samples (one when ``train.batch_size`` is 1). The process's random state is left as it was.
    Raises the ``ValueError`` of :func:`check_units_compose`.
    """
    num_samples = min(_NUM_SAMPLES, cfg.train.batch_size, len(dataset))
    inputs = torch.stack([torch.as_tensor(dataset[idx][0]) for idx in range(num_samples)])
    with torch.random.fork_rng(devices=[]):
        model = build_model(cfg)
    check_units_compose(model, inputs)


def check_units_compose(model: nn.Module, sample_inputs: Any) -> None:
    """Refuse a model whose ``forward`` differs from the chain of its units on ``sample_inputs``.

    The model runs in eval mode without gradients. Forward pre-hooks on the units observe the order in which
    ``forward`` calls them; outputs (tensors, or nested tuples / lists / dicts of them) are compared leaf
    by leaf with ``rtol=1e-4, atol=1e-5``. The model is left in eval mode.

    Raises:
        ValueError: naming what differs (call order, units never called or called more than once, or
            extra computation in ``forward``) and how to write the model instead.
    """
    units = model_units(model)
    names = [name for name, _ in units]
    model.eval()
    with torch.no_grad():
        expected, calls = _run_forward(model, units, sample_inputs)
        problems = _call_problems(names, calls)
        if not problems:
            problems = _output_problems(units, sample_inputs, expected)
    if problems:
        raise ValueError(f"model: {'; '.join(problems)}; {_WHAT_RUNS}")


def _run_forward(
    model: nn.Module, units: Sequence[tuple[str, nn.Module]], inputs: Any
) -> tuple[Any, list[str]]:
    """Call the model's own ``forward`` on ``inputs``; return its output and the units it called, in order."""
    calls: list[str] = []
    handles = [
        module.register_forward_pre_hook(lambda _module, _args, name=name: calls.append(name))
        for name, module in units
    ]
    try:
        output = model(inputs)
    except Exception as error:  # the user's forward: any failure is a model / data mismatch
        raise ValueError(
            f"model: forward fails on the first samples of the data ({type(error).__name__}: {error}); "
            "pick a data / model pair that matches"
        ) from None
    finally:
        for handle in handles:
            handle.remove()
    return output, calls


def _call_problems(names: Sequence[str], calls: Sequence[str]) -> list[str]:
    """What is wrong with the units ``forward`` called (``calls``, in order) against those registered."""
    problems = []
    repeated = [name for name in names if calls.count(name) > 1]
    if repeated:
        problems.append(
            f"forward calls units {repeated} more than once, but each unit is one step of the pipeline: "
            "give each call its own child module (e.g. two nn.ReLU() children), or put the repeated use "
            "inside one unit module"
        )
    missing = [name for name in names if name not in calls]
    if missing:
        problems.append(
            f"forward never calls units {missing}, but every unit is a step of the pipeline: remove them "
            "from the model or call each of them once in forward"
        )
    called_order = list(dict.fromkeys(calls))
    if called_order != [name for name in names if name in called_order]:
        problems.append(
            f"units run in the order {called_order} but are registered as {list(names)}: register the "
            "children in the order forward calls them"
        )
    return problems


def _output_problems(units: Sequence[tuple[str, nn.Module]], inputs: Any, expected: Any) -> list[str]:
    """Compare the units applied in order with ``expected`` (the output of ``forward``)."""
    try:
        got = run_units(units, inputs)
    except Exception as error:  # the units of the user's model: any failure is a composition mismatch
        return [
            "forward computes something its units do not: applying the units in order fails on the data "
            f"({type(error).__name__}: {error}) where forward works; {_MOVE_INTO_A_UNIT}"
        ]
    expected_leaves, got_leaves = _leaves(expected, "output"), _leaves(got, "output")
    if [path for path, _ in expected_leaves] != [path for path, _ in got_leaves]:
        return [
            f"forward returns {_describe(expected)} but its units applied in order return {_describe(got)}; "
            f"{_MOVE_INTO_A_UNIT}"
        ]
    worst: tuple[float, str] | None = None
    for (path, want), (_, have) in zip(expected_leaves, got_leaves, strict=True):
        mismatch = _leaf_mismatch(path, want, have)
        if isinstance(mismatch, str):
            return [f"forward computes something its units do not: {mismatch}; {_MOVE_INTO_A_UNIT}"]
        if mismatch is not None and (worst is None or mismatch > worst[0]):
            worst = (mismatch, path)
    if worst is None:
        return []
    return [
        f"forward computes something its units do not (max abs difference {worst[0]:.3g} in {worst[1]} "
        f"between forward and the units applied in order); {_MOVE_INTO_A_UNIT}"
    ]


def _leaves(value: Any, path: str) -> list[tuple[str, Any]]:
    """``(path, leaf)`` pairs of a value nested in tuples, lists and dicts."""
    if isinstance(value, (tuple, list)):
        return [leaf for idx, item in enumerate(value) for leaf in _leaves(item, f"{path}[{idx}]")]
    if isinstance(value, dict):
        return [leaf for key, item in value.items() for leaf in _leaves(item, f"{path}[{key!r}]")]
    return [(path, value)]


def _describe(value: Any) -> str:
    """A short description of a nested output's structure, e.g. ``tuple(Tensor(2, 3), Tensor(2,))``."""
    if isinstance(value, torch.Tensor):
        return f"Tensor{tuple(value.shape)}"
    if isinstance(value, (tuple, list)):
        return f"{type(value).__name__}({', '.join(_describe(item) for item in value)})"
    if isinstance(value, dict):
        return "dict(" + ", ".join(f"{key!r}: {_describe(item)}" for key, item in value.items()) + ")"
    text = repr(value)
    return text if len(text) <= 40 else f"{type(value).__name__} {text[:37]}..."


def _leaf_mismatch(path: str, want: Any, have: Any) -> float | str | None:
    """``None`` when two leaves match; else their max abs difference, or what else differs (a phrase)."""
    if not (isinstance(want, torch.Tensor) and isinstance(have, torch.Tensor)):
        if isinstance(want, torch.Tensor) or isinstance(have, torch.Tensor) or want != have:
            return (
                f"{path} is {_describe(want)} from forward but {_describe(have)} from its units applied "
                "in order"
            )
        return None
    if want.shape != have.shape or want.dtype != have.dtype:
        return (
            f"{path} is {_describe(want)} ({want.dtype}) from forward but {_describe(have)} ({have.dtype}) "
            "from its units applied in order"
        )
    if not (want.is_floating_point() or want.is_complex()):
        return None if torch.equal(want, have) else float((have.double() - want.double()).abs().max())
    close = torch.isclose(have, want, rtol=_RTOL, atol=_ATOL, equal_nan=True)
    if close.all():
        return None
    difference = (have - want).abs().nan_to_num(nan=float("inf"))
    return float(difference[~close].max())
