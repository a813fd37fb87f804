"""Keras-style callbacks for :meth:`xrnn.Sequential.fit`: ``fit(..., callbacks=[...])``.

The names, arguments, defaults and decisions follow Keras 3
(``keras.callbacks``), so code written for Keras reads the same here:

- :class:`Callback`: the base class with Keras's hooks (``on_train_begin``,
  ``on_epoch_begin``, ``on_epoch_end``, ``on_train_batch_begin``, ...),
  ``self.model`` and ``self.params``; set ``self.model.stop_training = True``
  to stop after the current epoch.
- :class:`EarlyStopping`: stop when the monitored value stops improving;
  optionally restore the best epoch's weights.
- :class:`ModelCheckpoint`: write xrnn's safe checkpoint (no pickle; JSON
  header, raw tensors, SHA-256; atomic) every epoch or only on improvement;
  ``filepath`` may contain ``{epoch}`` and any log key (``{val_loss:.3f}``).
- :class:`ReduceLROnPlateau`: multiply the optimizer's learning rate by
  ``factor`` when the monitored value plateaus; adds ``"learning_rate"`` to the
  logs, so to ``History``.
- :class:`CSVLogger`: one CSV row per epoch (``epoch`` then the log keys, sorted).

``logs`` at the end of an epoch hold Python floats: ``"loss"``, the compiled
metrics, ``"val_loss"`` and ``"val_<metric>"`` when there is validation data.
The per-batch hooks get ``{"loss": running mean}``; they are only fed (one
host read per batch) when some callback overrides them, so a plain ``fit``
keeps its one host read per epoch.
"""

from __future__ import annotations

import csv
import math
import os
import warnings
from typing import IO, Any

import numpy as np

from .backend import to_numpy
from .errors import ConfigError

__all__ = ["Callback", "CallbackList", "EarlyStopping", "ModelCheckpoint", "ReduceLROnPlateau", "CSVLogger"]


class Callback:
    """Base class: override any hook. ``self.model`` is the model being fitted,
    ``self.params`` ``{"epochs", "steps", "verbose"}`` (steps per epoch)."""

    def __init__(self) -> None:
        self.model: Any = None
        self.params: dict = {}

    def set_model(self, model: Any) -> None:
        self.model = model

    def set_params(self, params: dict) -> None:
        self.params = params

    # Keras's hooks, all no-ops here
    def on_train_begin(self, logs: dict | None = None) -> None: ...
    def on_train_end(self, logs: dict | None = None) -> None: ...
    def on_epoch_begin(self, epoch: int, logs: dict | None = None) -> None: ...
    def on_epoch_end(self, epoch: int, logs: dict | None = None) -> None: ...
    def on_train_batch_begin(self, batch: int, logs: dict | None = None) -> None: ...
    def on_train_batch_end(self, batch: int, logs: dict | None = None) -> None: ...
    def on_test_begin(self, logs: dict | None = None) -> None: ...
    def on_test_end(self, logs: dict | None = None) -> None: ...
    def on_test_batch_begin(self, batch: int, logs: dict | None = None) -> None: ...
    def on_test_batch_end(self, batch: int, logs: dict | None = None) -> None: ...
    def on_predict_begin(self, logs: dict | None = None) -> None: ...
    def on_predict_end(self, logs: dict | None = None) -> None: ...
    def on_predict_batch_begin(self, batch: int, logs: dict | None = None) -> None: ...
    def on_predict_batch_end(self, batch: int, logs: dict | None = None) -> None: ...

    # Keras's older names: the training batch hooks
    def on_batch_begin(self, batch: int, logs: dict | None = None) -> None:
        self.on_train_batch_begin(batch, logs)

    def on_batch_end(self, batch: int, logs: dict | None = None) -> None:
        self.on_train_batch_end(batch, logs)


class CallbackList:
    """The callbacks of one ``fit`` call, called in order (what ``Sequential.fit`` uses)."""

    def __init__(self, callbacks: Any, model: Any, params: dict):
        if callbacks is None:
            callbacks = []
        if isinstance(callbacks, Callback) or not isinstance(callbacks, (list, tuple)):
            callbacks = [callbacks]
        for c in callbacks:
            if not isinstance(c, Callback):
                raise ConfigError(f"callbacks must be xrnn.callbacks.Callback instances, got a {type(c).__name__}")
        self.callbacks = list(callbacks)
        for c in self.callbacks:
            c.set_model(model)
            c.set_params(dict(params))

    def _overrides(self, *names: str) -> bool:
        return any(getattr(type(c), n) is not getattr(Callback, n) for c in self.callbacks for n in names)

    @property
    def wants_batch_logs(self) -> bool:
        """True when some callback looks at training batches (then fit reads the loss every batch)."""
        return self._overrides("on_train_batch_begin", "on_train_batch_end", "on_batch_begin", "on_batch_end")

    def __getattr__(self, hook: str):
        if not hook.startswith("on_"):
            raise AttributeError(hook)

        def call(*args):
            for c in self.callbacks:
                getattr(c, hook)(*args)

        return call


# ---------------------------------------------------------------------------
# watching a value
# ---------------------------------------------------------------------------

class _Monitor(Callback):
    """A monitored log value with Keras's improvement rule: ``current + min_delta`` below the
    best (mode min) or ``current - min_delta`` above it (mode max); ``mode="auto"`` minimises
    losses and errors and maximises accuracies."""

    def __init__(self, monitor: str = "val_loss", mode: str = "auto", baseline: float | None = None,
                 min_delta: float = 0.0):
        super().__init__()
        if mode not in ("auto", "min", "max"):
            warnings.warn(f"{type(self).__name__} mode {mode!r} is unknown, fallback to auto mode.", stacklevel=3)
            mode = "auto"
        self.monitor = monitor
        self.mode = mode
        self.best = baseline
        self.min_delta = abs(float(min_delta))
        self._sign: int | None = None  # -1 minimise, +1 maximise (decided once the metric names are known)

    def _direction(self) -> int:
        if self._sign is None:
            if self.mode != "auto":
                self._sign = -1 if self.mode == "min" else 1
            else:
                name = self.monitor[4:] if self.monitor.startswith("val_") else self.monitor
                if name == "loss" or name in ("mse", "mae", "mean_squared_error", "mean_absolute_error"):
                    self._sign = -1
                elif name in ("accuracy", "acc", "binary_accuracy", "categorical_accuracy",
                              "sparse_categorical_accuracy"):
                    self._sign = 1
                else:
                    raise ConfigError(
                        f"{type(self).__name__} received monitor={self.monitor!r}, whose direction is not known; "
                        "pass mode='max' to keep the highest value or mode='min' to keep the lowest"
                    )
        return self._sign

    def _is_improvement(self, current: float, reference: float | None) -> bool:
        if reference is None:
            return True
        if self._direction() < 0:
            return current + self.min_delta < reference
        return current - self.min_delta > reference

    def _value(self, logs: dict | None, what: str):
        logs = logs or {}
        v = logs.get(self.monitor)
        if v is None:
            warnings.warn(f"{what} conditioned on metric `{self.monitor}` which is not available. Available "
                          f"metrics are: {','.join(logs)}", stacklevel=3)
        return v


class EarlyStopping(_Monitor):
    """Stop training when ``monitor`` has not improved for ``patience`` epochs (Keras's rule).

    Args:
        monitor: the log key to watch (default ``"val_loss"``).
        min_delta: a change smaller than this is no improvement.
        patience: epochs without improvement before stopping.
        verbose: 1 prints when it stops and when it restores weights.
        mode: ``"auto"``, ``"min"`` or ``"max"``.
        baseline: training stops if the value does not beat it within
            ``patience`` epochs.
        restore_best_weights: at the end of training, load the weights of
            the best epoch (a host copy is kept of them, taken at each improvement).
        start_from_epoch: epochs to wait before watching.

    Attributes:
        stopped_epoch: the (0-based) epoch at which it stopped; 0 if it did not.
        best, best_epoch, wait: as Keras.
    """

    def __init__(self, monitor: str = "val_loss", min_delta: float = 0, patience: int = 0, verbose: int = 0,
                 mode: str = "auto", baseline: float | None = None, restore_best_weights: bool = False,
                 start_from_epoch: int = 0):
        super().__init__(monitor, mode, min_delta=min_delta)
        self.patience = patience
        self.verbose = verbose
        self.baseline = baseline
        self.restore_best_weights = restore_best_weights
        self.start_from_epoch = start_from_epoch
        self.wait = 0
        self.stopped_epoch = 0
        self.best_weights: dict | None = None
        self.best_epoch = 0

    def on_train_begin(self, logs: dict | None = None) -> None:
        self.wait = 0
        self.stopped_epoch = 0
        self.best = None
        self.best_weights = None
        self.best_epoch = 0

    def _weights(self) -> dict:
        return {k: np.array(to_numpy(v), copy=True) for k, v in self.model.state_dict().items()}

    def on_epoch_end(self, epoch: int, logs: dict | None = None) -> None:
        self._direction()
        current = self._value(logs, "Early stopping")
        if current is None or epoch < self.start_from_epoch:
            return
        if self.restore_best_weights and self.best_weights is None:
            self.best_weights = self._weights()  # nothing better seen yet: these are the best
            self.best_epoch = epoch
        self.wait += 1
        if self._is_improvement(current, self.best):
            self.best = current
            self.best_epoch = epoch
            if self.restore_best_weights:
                self.best_weights = self._weights()
            if self.baseline is None or self._is_improvement(current, self.baseline):
                self.wait = 0
            return
        if self.wait >= self.patience and epoch > 0:
            self.stopped_epoch = epoch
            self.model.stop_training = True

    def on_train_end(self, logs: dict | None = None) -> None:
        if self.stopped_epoch > 0 and self.verbose > 0:
            print(f"Epoch {self.stopped_epoch + 1}: early stopping")
        if self.restore_best_weights and self.best_weights is not None:
            if self.verbose > 0:
                print(f"Restoring model weights from the end of the best epoch: {self.best_epoch + 1}.")
            self.model.load_state_dict(self.best_weights)


class ModelCheckpoint(_Monitor):
    """Save the model in xrnn's checkpoint format at the end of every epoch, or only on improvement.

    Args:
        filepath: where to write; formatted with ``epoch`` (1-based) and the
            epoch's logs: ``"ckpt/model-{epoch:02d}-{val_loss:.3f}.ckpt"``.
            Any extension is accepted (Keras wants ``.keras``; the file is
            xrnn's own safe format either way). Folders are created.
        monitor, mode: the value that decides "best" (default ``"val_loss"``).
        verbose: 1 prints each save.
        save_best_only: write only when ``monitor`` improves (a missing
            value saves, with a warning, as Keras).
        save_weights_only: write the model without its optimizer state and
            compile settings (``xrnn.load_model`` gives an uncompiled model;
            its ``state_dict()`` loads into the same architecture).
        save_freq: ``"epoch"`` (the only frequency supported).
        initial_value_threshold: the "best" value to beat at first.
    """

    def __init__(self, filepath: str | os.PathLike, monitor: str = "val_loss", verbose: int = 0,
                 save_best_only: bool = False, save_weights_only: bool = False, mode: str = "auto",
                 save_freq: str = "epoch", initial_value_threshold: float | None = None):
        super().__init__(monitor, mode, initial_value_threshold)
        if save_freq != "epoch":
            raise ConfigError(f"ModelCheckpoint saves once per epoch: save_freq must be 'epoch', got {save_freq!r}")
        self.filepath = os.fspath(filepath)
        self.verbose = verbose
        self.save_best_only = save_best_only
        self.save_weights_only = save_weights_only
        self.save_freq = save_freq

    def on_epoch_end(self, epoch: int, logs: dict | None = None) -> None:
        self._direction()
        logs = logs or {}
        try:
            path = self.filepath.format(epoch=epoch + 1, **logs)
        except KeyError as e:
            raise ConfigError(f"cannot format the ModelCheckpoint filepath {self.filepath!r}: no log value {e}; "
                              f"the logs hold epoch, {', '.join(logs)}") from None
        if self.save_best_only:
            current = logs.get(self.monitor)
            if current is None:
                warnings.warn(f"Can save best model only with {self.monitor} available.", stacklevel=2)
            else:
                best = "None" if self.best is None else f"{self.best:.5f}"
                if not self._is_improvement(current, self.best):
                    if self.verbose > 0:
                        print(f"\nEpoch {epoch + 1}: {self.monitor} did not improve from {best}")
                    return
                if self.verbose > 0:
                    print(f"\nEpoch {epoch + 1}: {self.monitor} improved from {best} to {current:.5f}, "
                          f"saving model to {path}")
                self.best = current
        elif self.verbose > 0:
            print(f"\nEpoch {epoch + 1}: saving model to {path}")
        if os.path.isdir(path):
            raise ConfigError(f"ModelCheckpoint's filepath {path!r} is a directory; give a file name")
        folder = os.path.dirname(path)
        if folder:
            os.makedirs(folder, exist_ok=True)
        from . import checkpoint

        checkpoint.save(_WeightsOnly(self.model) if self.save_weights_only else self.model, path)


class _WeightsOnly:
    """A model's checkpoint without its optimizer state and compile settings."""

    def __init__(self, model: Any):
        self.model = model
        self.checkpoint_kind = model.checkpoint_kind

    def checkpoint_state(self):
        meta, tensors = self.model.checkpoint_state()
        if "compile" in meta:
            meta = dict(meta, compile=None)
        return meta, {k: v for k, v in tensors.items() if not k.startswith("optimizer/")}


class ReduceLROnPlateau(_Monitor):
    """Multiply the learning rate by ``factor`` after ``patience`` epochs without improvement.

    Args:
        monitor: the log key to watch (default ``"val_loss"``).
        factor: the multiplier, < 1.
        patience: epochs without improvement before a reduction.
        verbose: 1 prints each reduction.
        mode: ``"auto"``, ``"min"`` or ``"max"``.
        min_delta: a change smaller than this is no improvement (default 1e-4).
        cooldown: epochs after a reduction during which waiting does not count.
        min_lr: the rate never goes below this.

    It records the rate at the end of every epoch as ``logs["learning_rate"]``
    (so ``history.history["learning_rate"]``), before any reduction, as Keras.
    """

    def __init__(self, monitor: str = "val_loss", factor: float = 0.1, patience: int = 10, verbose: int = 0,
                 mode: str = "auto", min_delta: float = 1e-4, cooldown: int = 0, min_lr: float = 0.0, **kwargs: Any):
        super().__init__(monitor, mode, min_delta=min_delta)
        if factor >= 1.0:
            raise ConfigError(f"ReduceLROnPlateau does not support a factor >= 1.0, got factor={factor}")
        if kwargs:
            raise ConfigError(f"ReduceLROnPlateau got unknown arguments {', '.join(sorted(kwargs))}")
        self.factor = factor
        self.min_lr = min_lr
        self.patience = patience
        self.verbose = verbose
        self.cooldown = cooldown
        self.cooldown_counter = 0
        self.wait = 0

    def on_train_begin(self, logs: dict | None = None) -> None:
        self.best = None
        self.cooldown_counter = 0
        self.wait = 0

    def in_cooldown(self) -> bool:
        return self.cooldown_counter > 0

    def _optimizer(self):
        opt = getattr(self.model, "optimizer", None)
        if opt is None:
            raise ConfigError("ReduceLROnPlateau needs a compiled model with an optimizer")
        return opt

    def on_epoch_end(self, epoch: int, logs: dict | None = None) -> None:
        self._direction()
        logs = logs if logs is not None else {}
        opt = self._optimizer()
        logs["learning_rate"] = float(opt.lr)
        current = self._value(logs, "Learning rate reduction")
        if current is None:
            return
        if self.in_cooldown():
            self.cooldown_counter -= 1
            self.wait = 0
        if self._is_improvement(current, self.best):
            self.best = current
            self.wait = 0
        elif not self.in_cooldown():
            self.wait += 1
            if self.wait >= self.patience:
                old = float(opt.lr)
                if old > float(np.float32(self.min_lr)):  # Keras compares against the float32 value
                    new = max(old * self.factor, self.min_lr)
                    opt.lr = new
                    if self.verbose > 0:
                        print(f"\nEpoch {epoch + 1}: ReduceLROnPlateau reducing learning rate to {new}.")
                    self.cooldown_counter = self.cooldown
                    self.wait = 0


class CSVLogger(Callback):
    """Write one CSV row per epoch: ``epoch`` (0-based) then the log keys in sorted order.

    Args:
        filename: the CSV file.
        separator: the field separator (default ``","``).
        append: add to an existing file (its header is kept, not repeated)
            instead of replacing it.

    As Keras: when the first epoch's logs have no ``val_`` keys, ``val_<key>``
    columns are added anyway (written as ``NA``); non-finite values are
    written as ``nan``/``inf``; the file is flushed after every row.
    """

    def __init__(self, filename: str | os.PathLike, separator: str = ",", append: bool = False):
        super().__init__()
        self.sep = separator
        self.filename = os.fspath(filename)
        self.append = append
        self.keys: list[str] | None = None
        self.writer: csv.DictWriter | None = None
        self.append_header = True
        self.csv_file: IO[str] | None = None

    def on_train_begin(self, logs: dict | None = None) -> None:
        mode = "w"
        if self.append:
            if os.path.exists(self.filename):
                with open(self.filename, encoding="utf-8") as f:
                    self.append_header = not bool(len(f.readline()))
            mode = "a"
        if self.csv_file is not None and not self.csv_file.closed:
            self.csv_file.close()
        self.csv_file = open(self.filename, mode, newline="", encoding="utf-8")
        self.keys = None
        self.writer = None

    def on_epoch_end(self, epoch: int, logs: dict | None = None) -> None:
        logs = logs or {}
        if self.keys is None:
            self.keys = sorted(logs)
            if self.keys and not any(k.startswith("val_") for k in self.keys):
                self.keys.extend(f"val_{k}" for k in list(self.keys))
        if self.writer is None:
            assert self.csv_file is not None, "on_train_begin opens the file"
            sep = self.sep

            class Dialect(csv.excel):
                delimiter = sep

            self.writer = csv.DictWriter(self.csv_file, fieldnames=["epoch", *self.keys], dialect=Dialect)
            if self.append_header:
                self.writer.writeheader()
        row = {"epoch": epoch}
        row.update((k, _cell(logs.get(k, "NA"))) for k in self.keys)
        self.writer.writerow(row)
        if self.csv_file is not None:  # the writer writes to it
            self.csv_file.flush()

    def on_train_end(self, logs: dict | None = None) -> None:
        if self.csv_file is not None and not self.csv_file.closed:
            self.csv_file.close()
        self.writer = None


def _cell(v: Any) -> Any:
    if isinstance(v, str):
        return v
    if isinstance(v, (list, tuple)) or (isinstance(v, np.ndarray) and v.ndim > 0):
        return f'"[{", ".join(map(str, v))}]"'
    if isinstance(v, float) and not math.isfinite(v):
        return str(v)
    return v
