"""Where a run is: the counters a checkpoint stores so that a resumed run continues exactly."""

from __future__ import annotations

from dataclasses import asdict, dataclass


@dataclass
class TrainState:
    epoch: int = 0  # epochs finished
    batch_in_epoch: int = 0  # batches done in the current epoch
    step: int = 0  # optimizer steps (skipped ones included)
    epoch_loss_sum: float = 0.0  # sum of this epoch's per-step global-batch losses so far
    epoch_loss_count: int = 0
    min_loss: float | None = None  # lowest mean epoch loss after the warm-ups (min_loss.pt)
    best_dev_accuracy: float | None = None  # best View 1 dev-test accuracy (best.pt)
    threshold: float | None = None  # the View 1 threshold of the final weights

    def to_checkpoint(self) -> dict:
        return asdict(self)

    @classmethod
    def from_checkpoint(cls, ckpt: dict) -> "TrainState":
        return cls(
            epoch=int(ckpt["epoch"]),
            batch_in_epoch=int(ckpt["batch_in_epoch"]),
            step=int(ckpt["step"]),
            epoch_loss_sum=float(ckpt.get("epoch_loss_sum", 0.0)),
            epoch_loss_count=int(ckpt.get("epoch_loss_count", 0)),
            min_loss=ckpt.get("min_loss"),
            best_dev_accuracy=ckpt.get("best_dev_accuracy"),
            threshold=ckpt.get("threshold"),
        )

    def end_epoch(self, final_head: bool = True) -> tuple[float, bool]:
        """Close the epoch: (its mean loss, whether it is the lowest so far).

        ``final_head``: the epoch was trained with the final margin and scale throughout.
        Only such epochs compete for min_loss.pt: during the warm-ups the loss is that of an
        easier head, so an early, barely trained epoch would otherwise always look best."""
        mean = self.epoch_loss_sum / max(1, self.epoch_loss_count)
        improved = final_head and (self.min_loss is None or mean < self.min_loss)
        if improved:
            self.min_loss = mean
        self.epoch += 1
        self.batch_in_epoch = 0
        self.epoch_loss_sum = 0.0
        self.epoch_loss_count = 0
        return mean, improved
