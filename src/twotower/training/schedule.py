"""The epoch schedule of ``Trainer.fit``, apart from training itself: which epoch is best, when to
stop, and when the mining rounds begin.

``TrainState`` is what a checkpoint records of it; ``EarlyStopping`` and ``MiningSchedule`` read and
change that state, so a resumed run goes on exactly where it stopped.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field


@dataclass
class TrainState:
    epoch: int = 0                 # epochs completed
    step: int = 0
    best_epoch: int = 0
    best_value: float = -math.inf
    bad_evals: int = 0
    stopped_early: bool = False
    stopped_by_caller: bool = False  # Trainer.fit's on_epoch asked to stop (a tuner's pruning or deadline)
    history: list[dict] = field(default_factory=list)
    # With mining rounds: the best epoch of a first phase that early-stopped, whose weights the
    # rounds started from (a refit replays the same jump).
    phase_one_best: int | None = None
    # The step the current mining round began with (None before the first round): the rounds' own
    # patience and learning-rate schedule count from it.
    round_start_step: int | None = None


class EarlyStopping:
    """Model selection on validation, and patience.

    Each validation value either beats every earlier one (a new best epoch: the caller keeps its
    weights) or counts as one more bad evaluation; ``patience`` bad evaluations in a row spend the
    patience (never with ``patience`` 0). Without a validation set every epoch is the best so far.
    """

    def __init__(self, state: TrainState, patience: int):
        self.state, self.patience = state, int(patience)

    def observe(self, epoch: int, value: float) -> bool:
        """Record ``epoch``'s validation value; True when it is the best so far (strictly higher)."""
        s = self.state
        if value > s.best_value:
            s.best_value, s.best_epoch, s.bad_evals = value, epoch, 0
            return True
        s.bad_evals += 1
        return False

    def take_unvalidated(self, epoch: int) -> None:
        """No validation set: ``epoch``, the latest, is the best."""
        self.state.best_epoch = epoch

    @property
    def spent(self) -> bool:
        return bool(self.patience) and self.state.bad_evals >= self.patience

    def restart(self) -> None:
        """A new phase begins with the whole patience; the best value stays the one to beat."""
        self.state.bad_evals = 0


class MiningSchedule:
    """The epochs of a run: ``epochs`` of the first phase, then ``rounds`` mining rounds of
    ``epochs_per_round`` epochs each, every round opened by a mining pass.

    The first phase may end before its ``epochs``: when it has converged (early stopping: the rounds
    start from its best weights, since mining needs a trained model, not a fixed epoch number), or,
    in a refit, where the run being replayed ended it (``jump_after``). ``end_first_phase`` then
    moves the state to the last epoch of the first phase, so the next epoch is the first round's.
    """

    def __init__(self, epochs: int, rounds: int = 0, epochs_per_round: int = 1, jump_after: int | None = None):
        self.epochs, self.rounds, self.epochs_per_round = int(epochs), int(rounds), int(epochs_per_round)
        self.jump_after = jump_after

    @property
    def total_epochs(self) -> int:
        return self.epochs + self.rounds * self.epochs_per_round

    def round_at(self, epoch: int) -> int | None:
        """The round (1-based) that starts with ``epoch`` (1-based), or None."""
        first = self.epochs + 1
        if not self.rounds or epoch < first or (epoch - first) % self.epochs_per_round:
            return None
        return (epoch - first) // self.epochs_per_round + 1

    def in_first_phase(self, epoch: int) -> bool:
        """Whether ``epoch`` is before the end of a first phase that mining rounds follow."""
        return bool(self.rounds) and epoch < self.epochs

    def replays_jump(self, epoch: int) -> bool:
        """Whether the run being replayed ended its first phase after ``epoch``."""
        return self.jump_after is not None and epoch == self.jump_after and self.in_first_phase(epoch)

    def end_first_phase(self, state: TrainState, best: int) -> int:
        """Skip to the end of the first phase: ``best`` is the epoch whose weights the rounds start
        from. Returns the epoch now completed (the next is the first round's)."""
        state.phase_one_best = best
        state.epoch = self.epochs
        return state.epoch
