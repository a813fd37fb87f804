"""Read a Keras 3 ``.keras`` file into a :class:`~xrnn.sequential.Sequential` on any device.

    model = xrnn.load_keras("model.keras", device="cuda")    # or Sequential.from_keras(...)
    yhat = model.predict(x)                                   # as keras_model.predict(x), to float32 rounding

A ``.keras`` file (Keras 3's ``model.save``) is a zip archive holding
``config.json`` (the model's architecture and, when compiled, its
``compile_config``), ``model.weights.h5`` (the weights, HDF5) and
``metadata.json``. Only data is read: the JSON is parsed and each layer
config is checked key by key against what xrnn's layers can honour; the
weights are read with h5py (``pip install "xrnn-array[keras]"``). Nothing in the
file is imported, unpickled or executed, so custom objects, lambdas and
functions named in a config are refused, never run.

Supported: a ``Sequential`` of ``InputLayer``, ``Dense``, ``Dropout``,
``Masking``, ``Embedding``, ``SimpleRNN``, ``LSTM``, ``GRU`` (``reset_after``
True), ``Bidirectional`` (merge modes concat, sum, ave, mul) and
``TimeDistributed``, in float32 or float64. Refused with a
:class:`~xrnn.errors.ConfigError` naming the layer and the option: any other
layer, a functional or subclassed model, ``unroll=True``,
``recurrent_dropout``, ``reset_after=False``, activations xrnn lacks,
regularizers, constraints, frozen layers (``trainable=False``), quantized
layers, mixed precision, a custom ``backward_layer``.

Weights: in the HDF5 file each layer of the Sequential is the group
``layers/<snake_case class name>`` (``_1``, ``_2``, ... for repeats, counted
per class name, in order; layers without weights count too), its arrays in
``vars/0``, ``vars/1``, ... (recurrent layers: ``cell/vars/...``;
Bidirectional: ``forward_layer/cell/vars/...`` then
``backward_layer/cell/vars/...``; TimeDistributed: ``layer/vars/...``): the
arrays of ``layer.get_weights()``, which :meth:`~xrnn.layers.Layer.set_weights`
takes. The optimizer's saved variables are not read: a loaded model starts
with a fresh optimizer state.

``compile_config`` (when present and ``compile=True``): the optimizer maps
onto :mod:`xrnn.keras_optim` (Keras' defaults and update rules), the loss
onto :mod:`xrnn.losses` (``from_logits`` must match the last layer: a
softmax/sigmoid output for Keras' default ``from_logits=False``, a linear one
for ``True``), the metrics onto ``compile``'s. Anything unmappable is refused;
``compile=False`` skips it.

Masks: outputs agree at every step, padded ones included (a padded step
repeats the last valid output, or is zero with ``zero_output_for_mask``, in
``Bidirectional`` with ``return_sequences`` and before a ``go_backwards``
sequence, as in Keras). The difference that remains (the layers' own, see
:mod:`xrnn.layers`): masks are *trailing* padding only (Keras also skips a
masked step inside a sequence).
"""

from __future__ import annotations

import io
import json
import os
import zipfile
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from . import layers as X
from . import losses as L
from .errors import ConfigError, ShapeError

if TYPE_CHECKING:
    from .sequential import Sequential

__all__ = ["load_keras", "read_keras_config"]

_MAX_JSON_BYTES = 64 << 20  # a config.json larger than this is not a model of these layers
_MAX_LAYERS = 4096

# class name -> the snake_case name Keras gives its weights group
_SNAKE = {"Dense": "dense", "Dropout": "dropout", "Masking": "masking", "Embedding": "embedding",
          "TimeDistributed": "time_distributed", "SimpleRNN": "simple_rnn", "LSTM": "lstm", "GRU": "gru",
          "Bidirectional": "bidirectional"}

# keys every layer config may have that do not change what the layer computes
_COMMON = ("name", "trainable", "dtype", "seed")
_NULL_ANY = ("kernel_regularizer", "recurrent_regularizer", "bias_regularizer", "activity_regularizer",
             "kernel_constraint", "recurrent_constraint", "bias_constraint", "embeddings_regularizer",
             "embeddings_constraint", "quantization_config", "noise_shape", "lora_rank", "lora_alpha")
_INITIALIZERS = ("kernel_initializer", "recurrent_initializer", "bias_initializer", "embeddings_initializer")
_RNN_KEYS = ("units", "activation", "use_bias", "return_sequences", "return_state", "go_backwards", "stateful",
             "dropout", "recurrent_dropout", "unroll", "zero_output_for_mask")
_KEYS = {
    "Dense": ("units", "activation", "use_bias"),
    "Dropout": ("rate",),
    "Masking": ("mask_value",),
    "Embedding": ("input_dim", "output_dim", "mask_zero"),
    "TimeDistributed": ("layer",),
    "SimpleRNN": _RNN_KEYS,
    "LSTM": _RNN_KEYS + ("recurrent_activation", "unit_forget_bias"),
    "GRU": _RNN_KEYS + ("recurrent_activation", "reset_after"),
    "Bidirectional": ("layer", "backward_layer", "merge_mode"),
}
_FLOATS = ("float32", "float64")


def _require_h5py():
    try:
        import h5py
    except ImportError:
        raise ImportError(
            "reading a .keras file needs h5py (its weights are HDF5): pip install \"xrnn-array[keras]\" "
            "(or pip install h5py)"
        ) from None
    return h5py


def _dtype_name(spec: Any, where: str) -> str | None:
    """The dtype of a Keras dtype policy (a name or ``{"class_name": "DTypePolicy", "config": {"name": ...}}``)."""
    if spec is None:
        return None
    name = spec
    if isinstance(spec, Mapping):
        if spec.get("class_name") not in ("DTypePolicy", "FloatDTypePolicy"):
            raise ConfigError(f"{where}: dtype policy {spec.get('class_name')!r} is not supported")
        name = (spec.get("config") or {}).get("name")
    if name not in _FLOATS:
        raise ConfigError(f"{where}: dtype {name!r} is not supported (xrnn takes float32 or float64; no mixed "
                          "precision)")
    return name


def _layer_from_keras(spec: Any, where: str, dtypes: set) -> tuple[str, X.Layer]:
    """(class name, unbuilt xrnn layer) for one Keras layer config; refuses what xrnn cannot honour."""
    if not isinstance(spec, Mapping) or not isinstance(spec.get("class_name"), str):
        raise ConfigError(f"{where}: a layer config is a dict with a 'class_name', got {type(spec).__name__}")
    cname = spec["class_name"]
    if cname not in _KEYS:
        raise ConfigError(
            f"{where}: Keras layer {cname!r} is not supported; xrnn reads {', '.join(['InputLayer', *_KEYS])}"
        )
    module = str(spec.get("module", "keras.layers"))
    if spec.get("registered_name") not in (None, cname) or module.split(".")[0] != "keras":
        raise ConfigError(f"{where}: {cname} is a custom (registered) layer, which is not supported")
    cfg = spec.get("config")
    if not isinstance(cfg, Mapping):
        raise ConfigError(f"{where}: the config of {cname} must be a dict")
    name = cfg.get("name")
    label = f"{where} ({cname} {name!r})"
    known = _COMMON + _NULL_ANY + _INITIALIZERS + _KEYS[cname]
    unknown = [k for k in cfg if k not in known]
    if unknown:
        raise ConfigError(f"{label}: option(s) {', '.join(map(repr, unknown))} are not supported")
    for k in _NULL_ANY:
        if cfg.get(k) is not None:
            raise ConfigError(f"{label}: {k}={cfg[k]!r} is not supported (only None)")
    if cfg.get("trainable", True) is not True:
        raise ConfigError(f"{label}: trainable={cfg['trainable']!r} (a frozen layer) is not supported")
    if "dtype" in cfg:
        d = _dtype_name(cfg["dtype"], label)
        if d is not None:
            dtypes.add(d)
    kw: dict = {}
    if isinstance(name, str) and name and "." not in name:
        kw["name"] = name

    def opt(key, default, allowed=None):
        v = cfg.get(key, default)
        if allowed is not None and v not in allowed:
            raise ConfigError(f"{label}: {key}={v!r} is not supported (xrnn takes {' or '.join(map(repr, allowed))})")
        return v

    def activation(key, default):
        v = cfg.get(key, default)
        if not isinstance(v, (str, type(None))):
            raise ConfigError(f"{label}: {key} {v!r} is not supported (a named activation only)")
        return v

    layer: X.Layer
    try:
        if cname == "Dense":
            layer = X.Dense(cfg["units"], activation=activation("activation", None),
                            use_bias=opt("use_bias", True), **kw)
        elif cname == "Dropout":
            layer = X.Dropout(cfg["rate"], **kw)
        elif cname == "Masking":
            layer = X.Masking(cfg.get("mask_value", 0.0), **kw)
        elif cname == "Embedding":
            layer = X.Embedding(cfg["input_dim"], cfg["output_dim"], mask_zero=opt("mask_zero", False), **kw)
        elif cname == "TimeDistributed":
            _, inner = _layer_from_keras(cfg["layer"], f"{label} wrapped layer", dtypes)
            inner.name = None
            layer = X.TimeDistributed(inner, **kw)
        elif cname == "Bidirectional":
            fwd = cfg["layer"]
            _, inner = _layer_from_keras(fwd, f"{label} forward layer", dtypes)
            back = cfg.get("backward_layer")
            if back is not None:
                _, bl = _layer_from_keras(back, f"{label} backward layer", dtypes)
                a, b = inner.get_config(), bl.get_config()
                for c in (a, b):
                    c.pop("name", None)
                b["go_backwards"] = not b["go_backwards"]
                if type(inner) is not type(bl) or a != b:
                    raise ConfigError(f"{label}: a backward_layer other than the forward layer's mirror image is "
                                      "not supported")
            inner.name = None
            mode = cfg.get("merge_mode", "concat")
            if mode not in X.MERGE_MODES:
                raise ConfigError(f"{label}: merge_mode={mode!r} is not supported (xrnn takes "
                                  f"{', '.join(map(repr, X.MERGE_MODES))})")
            if not isinstance(inner, X._Recurrent):  # Bidirectional's own check, made here for the type checker
                raise ConfigError(f"Bidirectional wraps an LSTM, GRU or SimpleRNN layer, got {type(inner).__name__}")
            layer = X.Bidirectional(inner, merge_mode=mode, **kw)
        else:  # recurrent
            opt("unroll", False, (False,))
            if float(cfg.get("recurrent_dropout", 0.0) or 0.0) != 0.0:
                raise ConfigError(f"{label}: recurrent_dropout={cfg['recurrent_dropout']!r} is not supported "
                                  "(only input dropout)")
            rk = {k: cfg[k] for k in ("return_sequences", "return_state", "go_backwards", "stateful", "use_bias",
                                      "zero_output_for_mask") if k in cfg}
            rk["dropout"] = cfg.get("dropout", 0.0)
            if cname == "SimpleRNN":
                layer = X.SimpleRNN(cfg["units"], activation=activation("activation", "tanh"), **rk, **kw)
            elif cname == "LSTM":
                layer = X.LSTM(cfg["units"], activation=activation("activation", "tanh"),
                               recurrent_activation=activation("recurrent_activation", "sigmoid"),
                               unit_forget_bias=opt("unit_forget_bias", True), **rk, **kw)
            else:
                opt("reset_after", True, (True,))
                layer = X.GRU(cfg["units"], activation=activation("activation", "tanh"),
                              recurrent_activation=activation("recurrent_activation", "sigmoid"), **rk, **kw)
    except KeyError as e:
        raise ConfigError(f"{label}: the config lacks {e.args[0]!r}") from None
    except ConfigError as e:
        if str(e).startswith(where):
            raise
        raise ConfigError(f"{label}: {e}") from None
    return cname, layer


def read_keras_config(config: Mapping) -> dict:
    """Check a ``.keras`` file's parsed ``config.json`` and map it: ``{"layers": [(class name, layer), ...],
    "input_shape": tuple or None, "dtype": str, "name": str, "compile": dict or None}`` (unbuilt layers)."""
    if not isinstance(config, Mapping):
        raise ConfigError("config.json must hold a JSON object")
    cname = config.get("class_name")
    if cname != "Sequential":
        raise ConfigError(
            f"the .keras file holds a {cname!r} model; xrnn reads Sequential models only (a functional or "
            "subclassed Keras model is not supported)"
        )
    cfg = config.get("config")
    if not isinstance(cfg, Mapping) or not isinstance(cfg.get("layers"), list):
        raise ConfigError("config.json: the Sequential's config has no 'layers' list")
    specs = cfg["layers"]
    if len(specs) > _MAX_LAYERS:
        raise ConfigError(f"config.json declares {len(specs):,} layers; at most {_MAX_LAYERS:,} are supported")
    dtypes: set = set()
    model_dtype = _dtype_name(cfg.get("dtype"), "the Sequential")
    input_shape = None
    out: list[tuple[str, X.Layer]] = []
    for i, spec in enumerate(specs):
        where = f"layer {i}"
        if isinstance(spec, Mapping) and spec.get("class_name") == "InputLayer":
            if out or input_shape is not None:
                raise ConfigError(f"{where}: an InputLayer after other layers is not supported")
            icfg = spec.get("config") or {}
            shape = icfg.get("batch_shape") or icfg.get("batch_input_shape")
            if not isinstance(shape, list) or len(shape) < 2:
                raise ConfigError(f"{where}: InputLayer needs a batch_shape like [null, timesteps, features]")
            if icfg.get("sparse") or icfg.get("ragged"):
                raise ConfigError(f"{where}: sparse or ragged inputs are not supported")
            input_shape = tuple(shape[1:])
            continue
        out.append(_layer_from_keras(spec, where, dtypes))
    if not out:
        raise ConfigError("the Sequential has no layers")
    if input_shape is None:
        build = (config.get("build_config") or cfg.get("build_config") or {}).get("input_shape")
        if isinstance(build, list) and len(build) >= 2:
            input_shape = tuple(build[1:])
    if model_dtype is not None:
        dtypes.add(model_dtype)
    if len(dtypes) > 1:
        raise ConfigError(f"the model mixes dtypes {sorted(dtypes)}; xrnn runs one dtype per model")
    name = cfg.get("name") if isinstance(cfg.get("name"), str) and cfg.get("name") else "sequential"
    return {"layers": out, "input_shape": input_shape, "dtype": (dtypes.pop() if dtypes else "float32"),
            "name": name, "compile": config.get("compile_config")}


def _weights_groups(cname: str, group) -> list:
    """The HDF5 groups holding one layer's arrays, in Keras' order."""
    if cname in ("SimpleRNN", "LSTM", "GRU"):
        return [group["cell"]["vars"]]
    if cname == "Bidirectional":
        return [group["forward_layer"]["cell"]["vars"], group["backward_layer"]["cell"]["vars"]]
    if cname == "TimeDistributed":
        return [group["layer"]["vars"]]
    return [group["vars"]]


def _read_weights(h5, model, classes: list) -> None:
    """Read each layer's arrays from the open HDF5 file and load them with ``set_weights``."""
    top = h5.get("layers")
    if top is None:
        raise ShapeError("model.weights.h5 has no 'layers' group (is it a Keras 3 weights file?)")
    counts: dict = {}
    for layer, cname in zip(model.layers, classes):
        base = _SNAKE[cname]
        k = counts.get(base)
        counts[base] = 0 if k is None else k + 1
        key = base if k is None else f"{base}_{k + 1}"
        specs = layer._keras_specs()
        if not specs:
            continue
        if key not in top:
            raise ShapeError(f"model.weights.h5 has no weights for layer {layer.name!r} (expected group layers/{key})")
        try:
            groups = _weights_groups(cname, top[key])
        except KeyError as e:
            raise ShapeError(f"model.weights.h5: layers/{key} lacks {e.args[0]!r} for layer {layer.name!r}") from None
        arrays: list = []  # host arrays, None past the expected count
        for g in groups:
            names = sorted(g.keys(), key=lambda s: int(s) if s.isdigit() else -1)
            for n in names:
                ds = g[n]
                j = len(arrays)
                if j < len(specs) and tuple(ds.shape) != tuple(specs[j][1]):
                    raise ShapeError(
                        f"layer {layer.name!r} ({cname}): {specs[j][0]} in layers/{key} has shape {tuple(ds.shape)}, "
                        f"the config gives {tuple(specs[j][1])}"
                    )
                if ds.dtype.kind != "f":
                    raise ShapeError(f"layer {layer.name!r}: layers/{key} holds {ds.dtype} data, not floats")
                arrays.append(ds[()] if j < len(specs) else None)
        layer.set_weights(arrays)  # counts checked there, with the layer's expected shapes


_LOSS_CLASSES = {"MeanSquaredError": "mse", "MeanAbsoluteError": "mae",
                 "SparseCategoricalCrossentropy": "cross_entropy", "CategoricalCrossentropy": "cross_entropy",
                 "BinaryCrossentropy": "binary_cross_entropy"}


def _map_loss(spec: Any, last: X.Layer) -> str:
    from_logits = False
    if isinstance(spec, str):
        loss = L.resolve_loss(spec)
    elif isinstance(spec, Mapping) and spec.get("class_name") in _LOSS_CLASSES:
        loss = _LOSS_CLASSES[spec["class_name"]]
        cfg = dict(spec.get("config") or {})
        from_logits = bool(cfg.pop("from_logits", False))
        ok: dict[str, tuple | None] = {"name": None, "reduction": ("sum_over_batch_size",), "ignore_class": (None,),
                                      "label_smoothing": (0, 0.0), "axis": (-1,), "dtype": None}
        for k, v in cfg.items():
            allowed = ok.get(k)
            if k not in ok or (allowed is not None and v not in allowed):
                raise ConfigError(f"compile_config: loss {spec['class_name']} option {k}={v!r} is not supported")
    else:
        raise ConfigError(f"compile_config: loss {spec!r} is not supported; xrnn maps {', '.join(_LOSS_CLASSES)}")
    if loss in ("cross_entropy", "binary_cross_entropy"):
        kind = last.output_kind
        want = "linear" if from_logits else ("softmax" if loss == "cross_entropy" else "sigmoid")
        if kind != want:
            raise ConfigError(
                f"compile_config: loss {loss} with from_logits={from_logits} reads the last layer's outputs as "
                f"{'logits' if from_logits else 'probabilities'}, but the last layer's output is {kind!r}; xrnn's "
                "cross-entropies take logits or softmax/sigmoid outputs as they are"
            )
    return loss


def _compile(model, comp: Any) -> None:
    if not isinstance(comp, Mapping):
        raise ConfigError("compile_config must be a dict")
    loss = comp.get("loss")
    if loss is None:
        return
    for k in ("loss_weights", "weighted_metrics"):
        if comp.get(k) is not None:
            raise ConfigError(f"compile_config: {k} is not supported")
    metrics = comp.get("metrics") or []
    if not isinstance(metrics, list) or not all(isinstance(m, str) for m in metrics):
        raise ConfigError(f"compile_config: metrics {metrics!r} are not supported (named metrics only)")
    optimizer = comp.get("optimizer", "rmsprop")  # Keras' compile default
    model.compile(optimizer=optimizer, loss=_map_loss(loss, model.layers[-1]), metrics=metrics or None)


def load_keras(path: str | os.PathLike, device: Any = "cpu", *, compile: bool = True, seed: Any = None) -> Sequential:
    """Rebuild a Keras 3 ``.keras`` model as an xrnn :class:`~xrnn.sequential.Sequential` on ``device``.

    Args:
        path: the ``.keras`` file (a zip with ``config.json`` and ``model.weights.h5``).
        device: where the weights go (``"cpu"``, ``"cuda"``, ``"torch:cpu"``, ...).
        compile: map the file's ``compile_config`` (optimizer, loss, metrics)
            onto ``model.compile`` (Keras' optimizers: :mod:`xrnn.keras_optim`).
        seed: the model's generator (dropout masks and shuffling when trained further).
    Returns:
        a built Sequential whose ``predict`` equals the Keras model's to float
        rounding (float32: about 1e-6).
    Raises:
        ImportError: h5py is not installed (``pip install "xrnn-array[keras]"``).
        ConfigError: not a readable ``.keras`` zip, or a model, layer or option
            xrnn does not support (named).
        ShapeError: weights missing or of the wrong shape for their layer.
    """
    from .modules import parameter_budget
    from .sequential import Sequential

    h5py = _require_h5py()
    path = Path(path)
    try:
        zf = zipfile.ZipFile(path)
    except (OSError, zipfile.BadZipFile) as e:
        raise ConfigError(f"{path} is not a .keras file (a zip archive written by Keras 3): {e}") from None
    with zf:
        names = set(zf.namelist())
        for need in ("config.json", "model.weights.h5"):
            if need not in names:
                raise ConfigError(f"{path} lacks {need}; a Keras 3 .keras file holds config.json and "
                                  "model.weights.h5 (older .h5/.keras formats are not supported)")
        info = zf.getinfo("config.json")
        if info.file_size > _MAX_JSON_BYTES:
            raise ConfigError(f"{path}: config.json is {info.file_size:,} bytes, more than a model config")
        try:
            config = json.loads(zf.read("config.json").decode("utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as e:
            raise ConfigError(f"{path}: config.json is not valid JSON: {e!r}") from None
        try:
            spec = read_keras_config(config)
        except RecursionError:
            raise ConfigError(f"{path}: config.json nests layers too deeply") from None
        wsize = zf.getinfo("model.weights.h5").file_size
        # the weights file bounds what the config may make us allocate (>= 2 bytes per value)
        with parameter_budget(wsize // 2 + 1024, f"the .keras file {path.name}"):
            model = Sequential([layer for _, layer in spec["layers"]], device=device, dtype=spec["dtype"],
                               seed=seed, name=spec["name"])
            if spec["input_shape"] is None:
                raise ConfigError(f"{path}: the model has no input shape (no InputLayer or build_config); "
                                  "it was never built in Keras")
            if not model.built:
                model.build((None,) + spec["input_shape"])
        data = zf.read("model.weights.h5")
    with h5py.File(io.BytesIO(data), "r") as h5:
        _read_weights(h5, model, [c for c, _ in spec["layers"]])
    if compile and spec["compile"] is not None:
        _compile(model, spec["compile"])
    return model
