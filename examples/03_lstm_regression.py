"""Vanilla, stacked and bidirectional LSTM regressors for one-step-ahead forecasting, Keras style.

Retraces the Keras "LSTM models for time series forecasting" mini-course: a
univariate series is cut into windows of ``n_steps`` values, each window
predicts the value that follows it, and three models are trained with
``compile(optimizer="adam", loss="mse")`` / ``fit`` exactly as in Keras::

    vanilla        Sequential([Input((n_steps, 1)), LSTM(50), Dense(1)])
    stacked        Sequential([Input((n_steps, 1)), LSTM(50, return_sequences=True), LSTM(50), Dense(1)])
    bidirectional  Sequential([Input((n_steps, 1)), Bidirectional(LSTM(50)), Dense(1)])

The script makes its own series (no download): a noisy sine, and a seasonal
series with a trend (period 12, like monthly data). The last 20% of each
series is the test set (split in time, never shuffled across it). Each model
is scored by its test MSE against the naive forecast "the next value equals
the last one", and a plot of predictions against the truth is saved as PNG.

Two details the mini-course leaves to the reader: inputs are standardised with
the training part's mean and standard deviation, and for the trending series
each window is taken *relative to its last value* (the model predicts the
change), so test values above the training range are no problem.

Run (about half a minute of CPU time, see examples/README.md; needs matplotlib, ``pip install "xrnn-array[plot]"``)::

    python examples/03_lstm_regression.py --out lstm_regression.png
    python examples/03_lstm_regression.py --series sine --epochs 50 --device cuda
"""

from __future__ import annotations

import argparse
import time

import numpy as np

import xrnn
from xrnn.layers import LSTM, Bidirectional, Dense, Input

MODELS = ("vanilla", "stacked", "bidirectional")


# ---------------------------------------------------------------------------
# data
# ---------------------------------------------------------------------------

def noisy_sine(n: int, rng: np.random.Generator, period: float = 40.0, noise: float = 0.1) -> np.ndarray:
    """``sin(2 pi t / period) + N(0, noise^2)`` for t = 0..n-1."""
    t = np.arange(n)
    return np.sin(2 * np.pi * t / period) + noise * rng.standard_normal(n)  # (n,)


def seasonal(n: int, rng: np.random.Generator, period: int = 12, noise: float = 0.3) -> np.ndarray:
    """Level 10, trend +0.05 per step, a yearly-style season of amplitude 2 with a harmonic, noise."""
    t = np.arange(n)
    season = 2.0 * np.sin(2 * np.pi * t / period) + 0.7 * np.cos(4 * np.pi * t / period)
    return 10.0 + 0.05 * t + season + noise * rng.standard_normal(n)  # (n,)


#: name -> (generator, whether windows are taken relative to their last value)
SERIES = {"sine": (noisy_sine, False), "seasonal": (seasonal, True)}


def split_sequence(series: np.ndarray, n_steps: int) -> tuple[np.ndarray, np.ndarray]:
    """Windows of ``n_steps`` values and the value after each: X (N, n_steps), y (N,)."""
    idx = np.arange(len(series) - n_steps)[:, None] + np.arange(n_steps)[None, :]  # (N, n_steps)
    return series[idx], series[n_steps:]


def make_dataset(name: str, n: int, n_steps: int, rng: np.random.Generator, test_fraction: float = 0.2) -> dict:
    """The series, its windows split in time, standardised; everything needed to score and plot."""
    make, relative = SERIES[name]
    series = make(n, rng)
    X, y = split_sequence(series, n_steps)  # (N, n_steps), (N,)
    last = X[:, -1].copy()  # (N,) the naive forecast
    if relative:
        X, y = X - last[:, None], y - last
    n_test = max(1, int(round(len(y) * test_fraction)))
    n_train = len(y) - n_test
    mean, std = X[:n_train].mean(), X[:n_train].std() + 1e-8
    Xs = ((X - mean) / std)[:, :, None].astype(np.float32)  # (N, n_steps, 1), Keras' (samples, timesteps, features)
    ys = ((y - mean) / std)[:, None].astype(np.float32)  # (N, 1)
    return {"name": name, "series": series, "n_steps": n_steps, "n_train": n_train, "relative": relative,
            "X": Xs, "y": ys, "mean": mean, "std": std, "last": last,
            "truth": series[n_steps:]}  # (N,) in the series' own units


def to_series_units(data: dict, pred_scaled: np.ndarray, rows: slice) -> np.ndarray:
    """Undo the standardisation (and the relative windows) of model outputs for samples ``rows``: (n, 1) -> (n,)."""
    v = pred_scaled[:, 0].astype(np.float64) * data["std"] + data["mean"]
    return v + data["last"][rows] if data["relative"] else v


# ---------------------------------------------------------------------------
# models
# ---------------------------------------------------------------------------

def build(kind: str, n_steps: int, units: int, device, seed: int) -> xrnn.Sequential:
    if kind == "vanilla":
        layers = [LSTM(units)]
    elif kind == "stacked":
        layers = [LSTM(units, return_sequences=True), LSTM(units)]
    elif kind == "bidirectional":
        layers = [Bidirectional(LSTM(units))]
    else:
        raise ValueError(f"unknown model {kind!r}; expected one of {MODELS}")
    model = xrnn.Sequential([Input((n_steps, 1))] + layers + [Dense(1)], device=device, seed=seed, name=kind)
    return model


def run_series(data: dict, args) -> dict:
    """Train the three models on one series; returns test MSEs and predictions in series units."""
    tr = slice(0, data["n_train"])
    te = slice(data["n_train"], len(data["y"]))
    truth = data["truth"][te]  # (n_test,)
    naive = data["last"][te]
    result = {"truth": truth, "naive_mse": float(np.mean((naive - truth) ** 2)), "mse": {}, "pred": {},
              "t": np.arange(data["n_steps"], len(data["series"]))[te]}
    print(f"\n== {data['name']}: {len(data['series'])} values, windows of {data['n_steps']}, "
          f"{data['n_train']} train / {len(truth)} test samples ==")
    print(f"  naive (last value)  test MSE {result['naive_mse']:.4f}")
    for kind in args.models:
        model = build(kind, data["n_steps"], args.units, args.device, args.seed)
        model.compile(optimizer="adam", loss="mse", learning_rate=args.lr)
        t0 = time.perf_counter()
        hist = model.fit(data["X"][tr], data["y"][tr], epochs=args.epochs, batch_size=args.batch_size, verbose=0)
        pred = to_series_units(data, xrnn.to_numpy(model.predict(data["X"][te])), te)  # (n_test,)
        mse = float(np.mean((pred - truth) ** 2))
        result["mse"][kind], result["pred"][kind] = mse, pred
        print(f"  {kind:<19} test MSE {mse:.4f}  ({mse / result['naive_mse']:.2f} x naive; "
              f"{model.num_parameters():,} parameters, train loss {hist.history['loss'][-1]:.4f}, "
              f"{time.perf_counter() - t0:.1f} s)")
    return result


# ---------------------------------------------------------------------------
# plot
# ---------------------------------------------------------------------------

def plot(results: dict, path: str) -> None:
    """Truth, naive forecast and each model's predictions on the test part, one panel per series."""
    try:
        import matplotlib
    except ImportError:
        raise SystemExit("the plot needs matplotlib: pip install 'xrnn-array[plot]' (or pip install matplotlib), "
                         "or pass --no-plot") from None
    matplotlib.use("Agg")  # files only, no display needed
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(len(results), 1, figsize=(10, 3.2 * len(results)), squeeze=False)
    for ax, (name, r) in zip(axes[:, 0], results.items()):
        ax.plot(r["t"], r["truth"], color="black", lw=2, label="truth")
        ax.plot(r["t"], np.concatenate([[np.nan], r["truth"][:-1]]), color="gray", ls=":",
                label=f"naive (MSE {r['naive_mse']:.3f})")
        for kind, pred in r["pred"].items():
            ax.plot(r["t"], pred, lw=1.2, label=f"{kind} (MSE {r['mse'][kind]:.3f})")
        ax.set_title(f"{name}: one-step-ahead forecasts on the test part")
        ax.set_xlabel("t")
        ax.legend(fontsize=8, loc="best")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    print(f"\nplot saved to {path}")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cpu", help='"cpu", "cuda", "torch:cpu", "auto" (a GPU if usable), ...')
    p.add_argument("--series", choices=("sine", "seasonal", "both"), default="both")
    p.add_argument("--models", nargs="+", choices=MODELS, default=list(MODELS))
    p.add_argument("--length", type=int, default=500, help="values per series")
    p.add_argument("--n-steps", type=int, default=12, help="window length (inputs per prediction)")
    p.add_argument("--units", type=int, default=50, help="LSTM units (the mini-course: 50)")
    p.add_argument("--epochs", type=int, default=60)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--lr", type=float, default=1e-3, help="Adam learning rate (Keras' default 1e-3)")
    p.add_argument("--out", default="lstm_regression.png", help="where to save the PNG plot")
    p.add_argument("--no-plot", action="store_true", help="skip the plot (no matplotlib needed)")
    p.add_argument("--seed", type=int, default=0, help="seeds the series and the models")
    return p.parse_args(argv)


def main(argv=None) -> dict:
    """Returns ``{series name: {"naive_mse", "mse": {model: mse}, "pred", "truth", "t"}}``."""
    args = parse_args(argv)
    names = ["sine", "seasonal"] if args.series == "both" else [args.series]
    rng = np.random.default_rng(args.seed)
    results = {}
    for name in names:
        data = make_dataset(name, args.length, args.n_steps, rng)
        results[name] = run_series(data, args)
    if not args.no_plot:
        plot(results, args.out)
    return results


if __name__ == "__main__":
    main()
