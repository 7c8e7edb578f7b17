"""Fast mode's step cache: skip whole transformer forwards, reusing the branch's last block residual.

Which forwards to skip is decided *before* a request runs, from magnitude ratios calibrated on the
real checkpoint (MagCache's rule, :func:`magcache_schedule`), never from the request's own
activations: on random weights a data-driven rule decides nonsense (pitfalls), and a schedule fixed
in advance keeps every decision outside the compiled blocks.

At run time (:class:`StepCache`) the transformer's block list is replaced by a :class:`CachedBlocks`
holding the same block modules (same names, same weights). With no schedule it iterates exactly like
the ``nn.ModuleList`` it replaces, so other modes run the very same calls. With one, each forward
either runs every block and keeps ``residual = out - in`` for its branch (cond or uncond), or runs no
block and returns ``in + residual``. The blocks themselves (compiled or not) never see the difference,
so skipping adds no graph to compile.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field
from typing import Sequence

import torch


def resample_nearest(values: Sequence[float], n: int) -> list[float]:
    """``values`` stretched or squeezed to ``n`` entries by nearest index (MagCache's interpolation)."""
    if n < 1:
        raise ValueError(f"need at least one entry, got {n}")
    if n == 1:
        return [float(values[-1])]
    scale = (len(values) - 1) / (n - 1)
    # round half to even, as numpy's round does in MagCache's nearest_interp
    return [float(values[int(round(i * scale))]) for i in range(n)]


def magcache_schedule(
    ratios: Sequence[float],
    steps: int,
    branches: int,
    threshold: float,
    max_skips: int,
    retention_ratio: float,
) -> list[list[bool]]:
    """Which forwards to compute, by MagCache's rule on calibrated magnitude ratios.

    Args:
        ratios: one ratio per forward of the calibration run, cond and uncond interleaved (the ratio of
            a forward's residual norm to that of the previous forward of the same branch).
        steps: denoising steps of this request.
        branches: 2 with CFG (cond then uncond per step), 1 without (cond only).
        threshold: the bound on the accumulated error ``sum |1 - prod(ratio)|`` since the last computed
            forward of the branch.
        max_skips: at most this many forwards of one branch in a row are skipped.
        retention_ratio: the first ``int(forwards * retention_ratio)`` forwards are always computed.
    Returns:
        ``compute[step][branch]``; a branch's first forward is always computed (nothing to reuse yet).
    """
    if branches not in (1, 2):
        raise ValueError(f"branches must be 1 or 2, got {branches}")
    per_branch = [resample_nearest(ratios[b::2], steps) for b in range(branches)]
    forwards = steps * branches
    retained = int(forwards * retention_ratio)
    compute = [[True] * branches for _ in range(steps)]
    for b in range(branches):
        product, skipped, error, has_residual = 1.0, 0, 0.0, False
        for i in range(steps):
            if i * branches + b < retained or not has_residual:
                has_residual = True
                continue
            product *= per_branch[b][i]
            skipped += 1
            error += abs(1.0 - product)
            if error < threshold and skipped <= max_skips:
                compute[i][b] = False
            else:  # compute, and start accumulating again from this forward
                product, skipped, error = 1.0, 0, 0.0
    return compute


class CachedBlocks(torch.nn.ModuleList):
    """The transformer's blocks; iterated per the step cache's decision for the current forward."""

    def __init__(self, blocks):
        super().__init__(blocks)
        self.decision: str | None = None  # None: plain; "compute" or "skip" while a schedule runs
        self.branch = 0
        self.residuals: dict[int, torch.Tensor] = {}
        self._input: torch.Tensor | None = None
        # Sequence parallelism (``ranks.py``) splits the tokens in the first block's pre-hook, so the
        # loop's input is whole and its output this rank's part: ``split`` takes that part of the input.
        self.split = None
        # Set on a CFG-parallel rank (``ranks.py``): of each step's two calls, this process computes
        # only the first, and with this branch's inputs; the second is answered by the other rank.
        self.cfg_rank: int | None = None

    def __iter__(self):
        if self.decision is None:
            return super().__iter__()
        if self.decision == "skip":
            return iter((self._reuse,))
        return itertools.chain((self._keep_input,), super().__iter__(), (self._keep_residual,))

    # Called in the block loop with the block arguments (hidden_states, context, temb, rope).
    def _keep_input(self, hidden_states, *_):
        self._input = self.split(hidden_states) if self.split is not None else hidden_states
        return hidden_states

    def _keep_residual(self, hidden_states, *_):
        self.residuals[self.branch] = hidden_states - self._input
        self._input = None
        return hidden_states

    def _reuse(self, hidden_states, *_):
        if self.split is not None:
            hidden_states = self.split(hidden_states)
        return hidden_states + self.residuals[self.branch]


@dataclass
class CacheRun:
    """What the cache did during one request."""

    schedule: list[list[bool]]
    branches: int
    computed: int = 0
    skipped: int = 0
    skipped_forwards: list[int] = field(default_factory=list)  # forward numbers, cond/uncond interleaved


class StepCache:
    """Runs a skip schedule over one transformer's forwards, one request at a time."""

    def __init__(self, transformer: torch.nn.Module):
        if not isinstance(transformer.blocks, CachedBlocks):
            transformer.blocks = CachedBlocks(transformer.blocks)
        self.blocks: CachedBlocks = transformer.blocks
        self.run: CacheRun | None = None
        self._forwards = 0
        self._hook = transformer.register_forward_pre_hook(self._before_forward)

    def begin(self, schedule: list[list[bool]] | None, branches: int = 1) -> None:
        """Start a request: follow ``schedule`` (``compute[step][branch]``), or None for plain forwards."""
        self.end()
        if schedule is not None:
            if any(len(row) != branches for row in schedule):
                raise ValueError("schedule rows must have one entry per branch")
            self.run = CacheRun(schedule=schedule, branches=branches)

    def end(self) -> CacheRun | None:
        """Finish the request: drop the residuals, go back to plain forwards; returns what was done."""
        run, self.run = self.run, None
        self._forwards = 0
        self.blocks.decision = None
        self.blocks.residuals.clear()
        self.blocks._input = None
        return run

    def _before_forward(self, module, args):
        run = self.run
        if run is None:
            return
        n = self._forwards
        self._forwards += 1
        step, branch = divmod(n, run.branches)
        if self.blocks.cfg_rank is not None and run.branches == 2:
            if branch == 1:
                return  # the other rank's branch: no block runs here
            branch = self.blocks.cfg_rank
        if step >= len(run.schedule):
            raise RuntimeError(f"forward {n + 1} is past the step cache's schedule of {len(run.schedule)} steps")
        skip = not run.schedule[step][branch] and branch in self.blocks.residuals
        self.blocks.branch = branch
        self.blocks.decision = "skip" if skip else "compute"
        if skip:
            run.skipped += 1
            run.skipped_forwards.append(n)
        else:
            run.computed += 1
