"""``import xrnn`` loads submodules on first use (PEP 562), and ``xrnn sample`` loads no training code.

Each check runs in a fresh interpreter (a subprocess), since this test process has imported
everything already. No timing is asserted; what is checked is which modules a process loaded,
and that every public name still resolves to its defining module's object.
"""

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

import xrnn
from xrnn.data import default_corpus_path

ROOT = Path(__file__).resolve().parent.parent

#: modules only training, Keras-style models, MPI or the training CLI need: ``xrnn sample`` must not load them
TRAINING_ONLY = ["xrnn.train", "xrnn.distributed", "xrnn.optim", "xrnn.callbacks", "xrnn.layers", "xrnn.sequential",
                 "xrnn.keras_io", "xrnn.keras_optim", "xrnn.losses", "xrnn.rundir", "xrnn.threads", "xrnn.gradcheck",
                 "mpi4py", "torch", "h5py", "keras"]


def python(code: str, timeout: int = 120) -> dict:
    """Run ``code`` in a fresh interpreter with this checkout on the path; it prints one JSON object."""
    env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    env.setdefault("OPENBLAS_NUM_THREADS", "1")
    r = subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True, env=env,
                       cwd=ROOT, timeout=timeout)
    assert r.returncode == 0, r.stderr[-3000:]
    return json.loads(r.stdout.strip().splitlines()[-1])


def test_import_xrnn_loads_no_submodule():
    got = python("""
        import json, sys
        import xrnn
        print(json.dumps({"modules": sorted(m for m in sys.modules if m == "xrnn" or m.startswith("xrnn.")),
                          "numpy": "numpy" in sys.modules, "version": xrnn.__version__}))
    """)
    assert got["modules"] == ["xrnn", "xrnn._version"]
    assert not got["numpy"]  # not even NumPy: the array library comes with the first name that needs it
    assert got["version"] == xrnn.__version__


def test_first_use_loads_only_the_defining_module_and_its_imports():
    got = python("""
        import json, sys
        import xrnn
        lstm = xrnn.LSTM
        print(json.dumps({"modules": sorted(m for m in sys.modules if m.startswith("xrnn.")),
                          "lstm_module": lstm.__module__}))
    """)
    assert got["lstm_module"] == "xrnn.modules"
    assert "xrnn.modules" in got["modules"]
    for heavy in TRAINING_ONLY:
        assert heavy not in got["modules"], heavy


def _write_checkpoints(tmp_path: Path) -> dict:
    """A CharLM checkpoint, a training run's last.ckpt, and a Sequential checkpoint (tiny)."""
    from xrnn import layers as K
    from xrnn.train import LAST

    vocab = xrnn.Vocabulary(list("abcdefgh \n"))
    model = xrnn.CharLM(len(vocab), 8, num_layers=2, cell="lstm", seed=0, vocab=vocab)
    xrnn.save(model, tmp_path / "model.ckpt")
    text = tmp_path / "text.txt"
    text.write_text(open(default_corpus_path(), encoding="utf-8").read()[:2000], encoding="utf-8")
    xrnn.train(text, steps=1, out_dir=tmp_path / "run", seed=0, hidden_size=8, num_layers=1, batch_size=2,
               seq_len=8, val_fraction=0.0, progress=False, sample_every=0, eval_every=0, save_every=0)
    seq = xrnn.Sequential([K.Input((3, 2)), K.LSTM(4), K.Dense(1)], seed=1)
    xrnn.save(seq, tmp_path / "seq.ckpt")
    return {"model": tmp_path / "model.ckpt", "run": tmp_path / "run" / LAST, "seq": tmp_path / "seq.ckpt"}


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    return _write_checkpoints(tmp_path_factory.mktemp("lazy"))


@pytest.mark.parametrize("which", ["model", "run"])
def test_xrnn_sample_loads_no_training_module(checkpoints, which):
    """``python -m xrnn sample`` on a model checkpoint and on a training run's checkpoint: the same text
    as :func:`xrnn.sample` in this process, and none of the training-only modules loaded."""
    ckpt = checkpoints[which]
    got = python(f"""
        import contextlib, io, json, runpy, sys
        sys.argv = ["xrnn", "sample", {str(ckpt)!r}, "--length", "30", "--seed", "5", "--top-k", "4"]
        out = io.StringIO()
        with contextlib.redirect_stdout(out):
            try:
                runpy.run_module("xrnn", run_name="__main__", alter_sys=True)
            except SystemExit as e:
                status = e.code
        print(json.dumps({{"status": status, "text": out.getvalue(), "modules": sorted(sys.modules)}}))
    """)
    assert got["status"] == 0
    model = xrnn.load_model(ckpt)
    assert got["text"] == xrnn.sample(model, length=30, seed=5, top_k=4) + "\n"
    loaded = set(got["modules"])
    assert {"xrnn.cli", "xrnn.models", "xrnn.sampling", "xrnn.checkpoint"} <= loaded  # it did sample
    assert not loaded & set(TRAINING_ONLY), sorted(loaded & set(TRAINING_ONLY))


def test_xrnn_help_and_info_load_no_training_module(checkpoints):
    got = python(f"""
        import contextlib, io, json, sys
        from xrnn.cli import main
        out = io.StringIO()
        with contextlib.redirect_stdout(out):
            info = main(["info", {str(checkpoints["model"])!r}])
            try:
                main(["sample", "--help"])
            except SystemExit as e:
                helped = e.code
        print(json.dumps({{"info": info, "help": helped, "text": out.getvalue(), "modules": sorted(sys.modules)}}))
    """)
    assert got["info"] == 0 and got["help"] == 0
    assert "2-layer LSTM, hidden size 8" in got["text"] and "--top-k" in got["text"]
    assert not set(got["modules"]) & set(TRAINING_ONLY), sorted(set(got["modules"]) & set(TRAINING_ONLY))


def test_every_public_name_is_its_defining_modules_object():
    """In a fresh process, ``xrnn.<name>`` and ``from xrnn import <name>`` give the object of the module
    that defines it (a class's or function's ``__module__``; a submodule is ``sys.modules``' own)."""
    got = python("""
        import importlib, json, sys, types
        import xrnn
        bad = []
        for name in xrnn.__all__:
            obj = getattr(xrnn, name)
            ns = {}
            exec(f"from xrnn import {name} as value", ns)
            if ns["value"] is not obj:
                bad.append(f"{name}: from-import differs")
            if name == "__version__":
                if obj != importlib.import_module("xrnn._version").__version__:
                    bad.append(name)
            elif isinstance(obj, types.ModuleType):
                if obj is not sys.modules.get(f"xrnn.{name}"):
                    bad.append(f"{name}: not the submodule xrnn.{name}")
            else:
                home = importlib.import_module(obj.__module__)
                if not obj.__module__.startswith("xrnn.") or getattr(home, name, None) is not obj:
                    bad.append(f"{name}: not {obj.__module__}.{name}")
        star = {}
        exec("from xrnn import *", star)
        print(json.dumps({"bad": bad, "star": sorted(set(star) - {"__builtins__"}), "all": sorted(xrnn.__all__),
                          "dir_missing": sorted(set(xrnn.__all__) - set(dir(xrnn)))}))
    """)
    assert got["bad"] == []
    assert got["star"] == got["all"]
    assert got["dir_missing"] == []


def test_public_names_resolve_the_same_in_this_process():
    """The same check in this (test) process, where everything is imported already: the names
    :func:`__getattr__` resolved earlier are the defining modules' objects."""
    import importlib
    import types

    for name in xrnn.__all__:
        obj = getattr(xrnn, name)
        if isinstance(obj, types.ModuleType):
            assert obj is sys.modules[f"xrnn.{name}"], name
        elif name != "__version__":
            assert getattr(importlib.import_module(obj.__module__), name) is obj, name


def test_xrnn_train_stays_the_function_after_the_submodule_loads():
    """The submodule ``xrnn.train`` shares its name with the public function; loading the submodule
    first (as ``from xrnn.train import ...`` does) must not replace the function on the package."""
    got = python("""
        import json, sys, types
        import xrnn
        from xrnn.train import Trainer
        import xrnn.train as via_import
        first = xrnn.train
        print(json.dumps({"function": isinstance(first, types.FunctionType) and first.__module__ == "xrnn.train",
                          "same": first is sys.modules["xrnn.train"].train, "via_import": via_import is first,
                          "trainer": Trainer is xrnn.Trainer}))
    """)
    assert got == {"function": True, "same": True, "via_import": True, "trainer": True}


def test_unknown_attribute_raises_attribute_error():
    with pytest.raises(AttributeError, match=r"module 'xrnn' has no attribute 'Bogus'.*xrnn\.__all__"):
        xrnn.Bogus  # noqa: B018
    assert not hasattr(xrnn, "lstm")  # names are case-sensitive: LSTM is the class
    with pytest.raises(ImportError, match="Bogus"):
        exec("from xrnn import Bogus", {})


def test_submodules_stay_reachable_as_attributes():
    """``xrnn.backend``, ``xrnn.models`` and the other submodules (attributes after the old eager
    import) still are, loading on first use."""
    got = python("""
        import json, sys
        import xrnn
        print(json.dumps({"backend": xrnn.backend is sys.modules["xrnn.backend"],
                          "models": xrnn.models.CharLM is xrnn.CharLM,
                          "in_dir": all(m in dir(xrnn) for m in ("backend", "models", "sampling", "layers"))}))
    """)
    assert got == {"backend": True, "models": True, "in_dir": True}


def test_load_knows_every_builtin_kind_without_importing_its_module(checkpoints):
    """``xrnn.load`` in a fresh process rebuilds a CharLM, a training run and a Sequential although
    nothing imported xrnn.train or xrnn.sequential first; ``registered_kinds`` lists all three."""
    got = python(f"""
        import json, sys
        import xrnn
        from xrnn.checkpoint import registered_kinds
        run = xrnn.load({str(checkpoints["run"])!r})
        seq = xrnn.load({str(checkpoints["seq"])!r})
        model = xrnn.load({str(checkpoints["model"])!r})
        print(json.dumps({{"types": [type(o).__name__ for o in (run, seq, model)], "kinds": registered_kinds()}}))
    """)
    assert got["types"] == ["Trainer", "Sequential", "CharLM"]
    assert {"xrnn.CharLM", "xrnn.Trainer", "xrnn.Sequential"} <= set(got["kinds"])


def test_sample_as_the_process_entry_skips_the_final_collections(checkpoints):
    """``xrnn sample`` as the process's command freezes the garbage collector's objects before exiting
    (so shutdown skips collecting them); ``main([...])`` called inside a longer-lived process must not."""
    ckpt = str(checkpoints["model"])
    got = python(f"""
        import contextlib, gc, io, json, runpy, sys
        from xrnn.cli import main
        with contextlib.redirect_stdout(io.StringIO()):
            in_process = main(["sample", {ckpt!r}, "--length", "3", "--seed", "1"])
        frozen_in_process = gc.get_freeze_count()
        sys.argv = ["xrnn", "sample", {ckpt!r}, "--length", "3", "--seed", "1"]
        with contextlib.redirect_stdout(io.StringIO()):
            try:
                runpy.run_module("xrnn", run_name="__main__", alter_sys=True)
            except SystemExit as e:
                status = e.code
        print(json.dumps({{"in_process": [in_process, frozen_in_process], "entry": [status, gc.get_freeze_count()]}}))
    """)
    assert got["in_process"] == [0, 0]
    assert got["entry"][0] == 0 and got["entry"][1] > 0
