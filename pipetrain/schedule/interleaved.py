"""Interleaved 1F1B (Megatron-LM's interleaved schedule, ``ScheduleInterleaved1F1B`` in PyTorch).

Each of the ``W`` workers hosts ``v`` stages ("chunks") in loop placement: worker ``r`` hosts stages
``r, r + W, r + 2W, ...``. Cutting the model into ``v`` times more, shorter stages divides the pipeline's
fill and drain time by ``v``: under unit costs (and ``m >= W``) the bubble drops from ``(W-1)/(m+W-1)``
(1F1B) to ``(W-1)/(v*m+W-1)``, at the price of ``v`` times more point-to-point transfers.

Every worker walks the same sequence of "virtual micro-batches" ``k = 0 .. v*m-1``. Micro-batches are
taken in rounds of ``g`` (``g = W`` when ``W`` divides ``m``): within a round, the worker runs forward
micro-batches ``g*round .. g*round+g-1`` through its first chunk, then through its second chunk, and so
on; backwards visit the chunks in reverse order. So forward ``k`` is

    round = k // (g*v),  chunk = (k // g) % v,  mb = g*round + k % g,  stage = chunk*W + r

and backward ``k`` the same with ``chunk = v-1 - (k // g) % v``. Worker ``r`` runs a warm-up of
``(v-1)*g + 2*(W-1-r)`` forwards (all of them if that is more), then alternates one forward and one
backward (steady 1F1B), then runs the remaining backwards (cool-down).

Micro-batch counts. The warm-up count assumes every round holds the same ``g`` micro-batches, and
``g >= W`` unless there is a single round: shorter rounds can deadlock (3 workers, rounds of 1), and so
can a short last round (7 micro-batches on 5 workers, v=2, as rounds of 5 and 2). Among the equal
splits the builder takes as many rounds as fit, ``rounds = max(1, m // W)``, which keeps the warm-up, and
so the micro-batches in flight, as small as Megatron-LM's; ``m`` must then be a multiple of ``rounds``.
This is PyTorch's rule. It accepts every multiple of ``W`` (Megatron-LM's requirement; then ``g = W``
and the orders coincide), any ``m < W`` (one round; the warm-up holds every forward) and counts like
10 on 4 workers (two rounds of 5); it refuses counts like 9 on 4 workers (two rounds cannot split 9;
one round of 9 would run, but its warm-up, like GPipe's, grows with ``m``). Older Megatron-LM versions
run every forward first when ``m == W``; this builder keeps the rule above there too, as PyTorch and
current Megatron-core do.
"""

from __future__ import annotations

from pipetrain.schedule.actions import Action, ActionKind
from pipetrain.schedule.layout import check_several_per_worker, check_sizes, num_workers_for
from pipetrain.schedule.placement import loop_placement
from pipetrain.schedule.schedule import Schedule

__all__ = ["interleaved_1f1b", "interleaved_round_size"]

_F, _B = ActionKind.FORWARD, ActionKind.BACKWARD


def _valid_counts_near(num_microbatches: int, num_workers: int) -> list[int]:
    """The accepted micro-batch counts just below and just above ``num_microbatches``."""
    below = next((m for m in range(num_microbatches - 1, 0, -1) if _round_size(m, num_workers)), None)
    above = next(
        m
        for m in range(num_microbatches + 1, 2 * num_microbatches + num_workers)
        if _round_size(m, num_workers)
    )
    return [m for m in (below, above) if m is not None]


def _round_size(num_microbatches: int, num_workers: int) -> int | None:
    """Micro-batches per round, or ``None`` when equal rounds cannot hold ``num_microbatches``."""
    rounds = max(1, num_microbatches // num_workers)
    return None if num_microbatches % rounds else num_microbatches // rounds


def interleaved_round_size(num_microbatches: int, num_workers: int) -> int:
    """Micro-batches per round ``g`` (``num_workers`` when it divides ``num_microbatches``).

    ``ValueError`` naming ``pipeline.num_microbatches`` and the nearest counts that work when equal
    rounds of at least ``num_workers`` micro-batches cannot hold ``num_microbatches``.
    """
    size = _round_size(num_microbatches, num_workers)
    if size is None:
        rounds = num_microbatches // num_workers
        near = " or ".join(map(str, _valid_counts_near(num_microbatches, num_workers)))
        raise ValueError(
            f"pipeline.num_microbatches={num_microbatches}: interleaved_1f1b on {num_workers} workers runs "
            f"micro-batches in equal rounds of at least {num_workers} (one per worker), and {rounds} rounds "
            f"cannot split {num_microbatches} evenly; set it to e.g. {near} (any multiple of {num_workers} "
            f"works, and so does any count below {num_workers})"
        )
    return size


def _virtual(k: int, round_size: int, num_chunks: int, backward: bool) -> tuple[int, int]:
    """``(chunk, mb)`` of virtual micro-batch ``k``."""
    round_idx, within = divmod(k, round_size * num_chunks)
    chunk, offset = divmod(within, round_size)
    return (num_chunks - 1 - chunk if backward else chunk), round_idx * round_size + offset


def _worker_actions(
    worker_idx: int, num_workers: int, num_chunks: int, num_microbatches: int
) -> list[Action]:
    """Worker ``worker_idx``'s warm-up forwards, steady one-forward-one-backward, cool-down backwards."""
    g = interleaved_round_size(num_microbatches, num_workers)
    total = num_chunks * num_microbatches
    warmup = min((num_chunks - 1) * g + 2 * (num_workers - 1 - worker_idx), total)

    def action(kind: ActionKind, k: int) -> Action:
        chunk, mb = _virtual(k, g, num_chunks, backward=kind is _B)
        return Action(chunk * num_workers + worker_idx, kind, mb)

    actions = [action(_F, k) for k in range(warmup)]
    for k in range(total - warmup):
        actions += [action(_F, warmup + k), action(_B, k)]
    actions += [action(_B, k) for k in range(total - warmup, total)]
    return actions


def interleaved_1f1b(num_stages: int, num_microbatches: int, stages_per_worker: int = 2) -> Schedule:
    """Interleaved 1F1B on ``num_stages / stages_per_worker`` workers, loop placement (see the module doc)."""
    check_sizes(num_stages, num_microbatches, stages_per_worker)
    check_several_per_worker("interleaved_1f1b", stages_per_worker)
    num_workers = num_workers_for(num_stages, stages_per_worker)
    interleaved_round_size(num_microbatches, num_workers)
    rows = tuple(
        tuple(_worker_actions(w, num_workers, stages_per_worker, num_microbatches))
        for w in range(num_workers)
    )
    return Schedule(rows, loop_placement(num_stages, num_workers), num_microbatches, "interleaved_1f1b")
