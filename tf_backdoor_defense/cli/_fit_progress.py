"""A ``fit`` callback that moves a console progress bar (imports TensorFlow: load it lazily)."""

from tf_backdoor_defense._keras import keras

__all__ = ["EpochProgress"]


class EpochProgress(keras.callbacks.Callback):
    """Moves a :class:`~tf_backdoor_defense.cli._console.Console` bar once per epoch.

    The bar shows the epoch's loss and accuracy (and the attack success
    rate that ``FinePruning`` logs when there is poisoned data).

    Examples
    --------
    >>> class Bar:
    ...     def update(self, n=1, info=None, force=False):
    ...         print(n, info, force)
    >>> EpochProgress(Bar()).on_epoch_end(0, {"loss": 0.25, "accuracy": 0.5})
    1 loss 0.2500  acc 0.5000 True
    """

    SHOWN = (("loss", "loss"), ("accuracy", "acc"), ("fine_pruning/attack_success_rate", "ASR"))

    def __init__(self, bar):
        super().__init__()
        self.bar = bar

    def on_epoch_end(self, epoch, logs=None):
        logs = logs or {}
        info = "  ".join(f"{short} {float(logs[key]):.4f}" for key, short in self.SHOWN
                         if key in logs)
        self.bar.update(1, info=info, force=True)
