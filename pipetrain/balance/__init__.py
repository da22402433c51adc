"""Automatic stage balancing: profile each unit, search the split that the schedule simulator runs fastest.

``python -m pipetrain.balance`` prints the comparison and writes a pipeline config; ``pipeline.balance=auto``
makes ``python -m pipetrain.train`` do the same before launch. Modules: :mod:`~pipetrain.balance.profile`
(measure the units, torch), :mod:`~pipetrain.balance.search` (the exact search, pure Python over the
schedule simulator), :mod:`~pipetrain.balance.plan` (one run's balance, with the per-process profile
cache), :mod:`~pipetrain.balance.report` (the printed table and the YAML).
"""

from pipetrain.balance.plan import AUTO, BalanceReport, balance_run, num_stages_of, result_record
from pipetrain.balance.search import (
    SplitPrediction,
    SplitSearch,
    UnitCost,
    predict_split,
    search_split,
    uniform_balance,
)

__all__ = [
    "AUTO",
    "BalanceReport",
    "SplitPrediction",
    "SplitSearch",
    "UnitCost",
    "balance_run",
    "num_stages_of",
    "predict_split",
    "result_record",
    "search_split",
    "uniform_balance",
]
