"""`EpochDataLoader`: a DataLoader that sets its dataset's epoch at every ``iter()`` and checkpoints the position
inside the epoch, so that a resumed run continues at the exact batch (see :mod:`data.pipeline` for the streams)."""

from __future__ import annotations

from typing import Any, Callable, Iterator

from torch.utils.data import DataLoader
from webdataset.utils import pytorch_worker_info

from data.pipeline import POSITION_KEY

__all__ = ["EpochDataLoader"]


class EpochDataLoader(DataLoader):
    """DataLoader that tells its dataset which epoch starts at every ``iter()`` (for per-epoch shuffles) and can
    resume an interrupted epoch at the exact batch.

    ``state_dict()`` (checkpointed by Lightning for a training loader) holds ``epochs_started`` and ``batches``: how
    many batches of the current epoch training has consumed. ``batches == 0`` means the next ``iter()`` starts epoch
    ``epochs_started``; ``batches == p > 0`` means the next ``iter()`` continues epoch ``epochs_started - 1`` after
    its first ``p`` batches, so a run resumed from a mid-epoch checkpoint sees exactly the batches the uninterrupted
    run would have seen (every stream of this module is a pure function of seed, epoch, rank and worker). For a
    `ShardStream` whose workers' batches came strictly in turn (`ShardStream.skips_exactly`) the state also holds
    where each worker's stream stood (``workers``, of the ``rank`` that wrote it), and on that rank the workers skip
    the raw samples already read without decoding them (`ShardStream.resume_from`); otherwise (other ranks, other
    datasets, shard streams that ran out unevenly) the epoch is replayed in fresh workers and its first ``p`` batches
    are discarded.

    ``consumed`` tells how many batches of the current epoch training has taken and whether the epoch is over
    (``(count, done)``, or None when unknown); `data.VideoDataModule` reads it from the Lightning fit loop, because
    the loop fetches one batch ahead of training when the loader has no length. Without it the loader counts the
    batches its iterator handed out. (Lightning 2.6 does not restore loader states when a run bounded only by
    ``max_epochs`` resumes from an end-of-epoch checkpoint; the epoch counter then restarts at 0.)
    """

    _KEPT_POSITIONS = 16  # batches whose worker positions are kept (the fit loop fetches at most one ahead)

    def __init__(self, *args: Any, consumed: Callable[[], tuple[int, bool] | None] | None = None,
                 **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.consumed = consumed
        self._epochs_started = 0
        self._yielded = 0  # batches of the current epoch handed out (or skipped on resuming)
        self._in_epoch = False  # an epoch has started and its iterator has not run out
        self._replay = 0  # batches of the interrupted epoch the next iter() continues after
        self._replay_workers: dict[int, Any] | None = None
        self._workers: dict[int, Any] = {}  # worker -> its stream's position after its latest batch
        self._positions: dict[int, dict[int, Any]] = {}  # batch index -> every worker's position after it
        self._in_turn = True  # so far this epoch's batches came from the workers strictly in turn

    def _num_streams(self) -> int:
        return max(1, self.num_workers)

    def __iter__(self):
        replay, self._replay = self._replay, 0
        workers, self._replay_workers = self._replay_workers, None
        epoch = self._epochs_started - 1 if replay else self._epochs_started
        if hasattr(self.dataset, "set_epoch"):
            self.dataset.set_epoch(epoch)
        self._epochs_started = epoch + 1
        self._yielded, self._in_epoch, self._in_turn = 0, True, True
        self._workers, self._positions = {}, {}
        skipping = bool(replay and workers is not None and self._skips_exactly())
        if skipping:
            self.dataset.resume_from({"rotate": replay % self._num_streams(), "workers": workers})
            self._yielded, self._workers = replay, dict(workers)
            self._positions[replay - 1] = dict(workers)
        try:
            batches = super().__iter__()  # a worker process (or, without workers, this one) takes the position
        finally:
            if skipping:
                self.dataset.resume_from(None)
        return self._counted(batches, epoch, 0 if skipping else replay)

    def _counted(self, batches: Iterator[Any], epoch: int, replay: int) -> Iterator[Any]:
        for _ in range(replay):
            try:
                self._note(next(batches))
            except StopIteration:
                raise RuntimeError(
                    f"cannot resume epoch {epoch} at batch {replay}: the stream now ends after {self._yielded} "
                    "batches; the data, its settings (batch_size, batches_per_epoch, num_workers, shards) or the "
                    "world size differ from the run that wrote the checkpoint"
                ) from None
        for batch in batches:
            yield self._note(batch)
        self._in_epoch = False

    def _note(self, batch: Any) -> Any:
        """Count ``batch`` and take its stream position out of it."""
        index = self._yielded
        self._yielded += 1
        if isinstance(batch, dict) and POSITION_KEY in batch:
            position = batch.pop(POSITION_KEY)
            worker = int(position[0])
            self._in_turn = self._in_turn and worker == index % self._num_streams()
            self._workers[worker] = [int(position[1]), int(position[2]),
                                     None if position[3] is None else list(position[3])]
            if self._in_turn:
                self._positions[index] = dict(self._workers)
                self._positions.pop(index - self._KEPT_POSITIONS, None)
        return batch

    def state_dict(self) -> dict[str, Any]:
        """``{"epochs_started", "batches"}`` and, when known, ``workers``: see the class docstring."""
        if not self._in_epoch:
            return {"epochs_started": self._epochs_started, "batches": 0}
        known = self.consumed() if self.consumed is not None else None
        count, done = known if known is not None else (self._yielded, False)
        length = self._length()
        if done or (length is not None and count >= length):
            return {"epochs_started": self._epochs_started, "batches": 0}
        if count == 0:  # the epoch started but training has taken nothing of it yet
            return {"epochs_started": self._epochs_started - 1, "batches": 0}
        state: dict[str, Any] = {"epochs_started": self._epochs_started, "batches": int(count)}
        workers = self._positions.get(count - 1) if self._in_turn and self._skips_exactly() else None
        if workers is not None:  # this rank's streams: a checkpoint written by one rank skips decoding on that rank
            state.update(workers=workers, num_workers=self.num_workers, rank=pytorch_worker_info()[0])
        return state

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        epochs, batches = int(state_dict["epochs_started"]), int(state_dict.get("batches", 0))
        if batches < 0 or (batches > 0 and epochs < 1):
            raise ValueError(f"invalid loader state {state_dict}: a mid-epoch position needs epochs_started >= 1 "
                             "and batches >= 0")
        self._epochs_started, self._replay, self._in_epoch = epochs, batches, False
        workers = state_dict.get("workers")
        rank = pytorch_worker_info()[0]
        usable = state_dict.get("num_workers") == self.num_workers and state_dict.get("rank") == rank
        self._replay_workers = {int(k): v for k, v in workers.items()} if workers and usable else None

    def _skips_exactly(self) -> bool:
        skips = getattr(self.dataset, "skips_exactly", None)
        return skips is not None and bool(skips(self.num_workers))

    def _length(self) -> int | None:
        try:
            return len(self)
        except TypeError:
            return None
