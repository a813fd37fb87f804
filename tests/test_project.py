"""The project's promises about itself: README commands, CI, dependencies, the architecture map."""

import pathlib
import re

import pytest

tomllib = pytest.importorskip("tomllib")  # Python >= 3.11; the check itself is version-independent

ROOT = pathlib.Path(__file__).resolve().parent.parent


def _readme_commands():
    text = (ROOT / "README.md").read_text()
    section = text.split("## Set up", 1)[1].split("\n## ", 1)[0]
    return re.findall(r"```bash\n(.*?)\n```", section, re.S)


def test_readme_has_exactly_two_setup_commands():
    cmds = _readme_commands()
    assert len(cmds) == 2, cmds
    train, test = cmds
    assert "xrnn train" in train and "pip install" in train
    assert "pytest" in test and "pip install" in test


def test_ci_runs_the_readme_test_command_verbatim():
    ci = (ROOT / ".ci" / "run").read_text()
    test_cmd = _readme_commands()[1]
    assert test_cmd in ci.splitlines(), "'.ci/run' must run README's test command"


def test_runtime_dependencies_are_only_numpy_and_array_api_compat():
    meta = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    names = sorted(re.split(r"[<>=!~ \[]", d)[0].lower() for d in meta["dependencies"])
    assert names == ["array-api-compat", "numpy"]
    extras = meta["optional-dependencies"]
    assert any("cupy-cuda12x" in d for d in extras["cuda12"])
    assert any("cupy-cuda13x" in d for d in extras["cuda13"])
    assert meta["requires-python"] == ">=3.10"


def test_architecture_map_names_every_module():
    doc = (ROOT / "docs" / "architecture.md").read_text()
    for path in sorted((ROOT / "xrnn").rglob("*.py")):
        rel = path.relative_to(ROOT).as_posix()
        if path.name in ("__init__.py", "__main__.py") and path.parent.name == "xrnn":
            continue
        if path.parent.name == "kernels":
            rel = "xrnn/kernels/"
        assert rel in doc, f"{rel} is missing from docs/architecture.md"


def test_library_code_never_imports_torch_or_pickle():
    """torch is a backend choice (resolved in backend.py only) and a test oracle, never a dependency."""
    for path in (ROOT / "xrnn").rglob("*.py"):
        src = path.read_text()
        if path.name != "backend.py":
            assert not re.search(r"^\s*(import|from)\s+torch\b", src, re.M), path
        assert not re.search(r"^\s*(import|from)\s+pickle\b", src, re.M), path
        assert "allow_pickle=True" not in src, path


def _dockerfile(name):
    text = (ROOT / "docker" / name).read_text()
    instr = [ln.split(None, 1) for ln in text.splitlines() if ln and not ln.startswith("#")]
    return text, [(k.upper(), v.strip()) for k, v in (i if len(i) == 2 else (i[0], "") for i in instr)]


@pytest.mark.parametrize("name,base,extra", [("Dockerfile.cpu", "python:3.12-slim", None),
                                             ("Dockerfile.cuda", "nvidia/cuda:12.", "cuda12")])
def test_docker_images_match_the_cli_the_package_and_the_readme(name, base, extra):
    """Read, not built (no Docker engine here): what each image copies is all the package
    needs, its CUDA major matches the CuPy extra, the mounted folder is where ``xrnn train``
    writes by default, and README shows how to build and run it."""
    from xrnn.cli import build_parser

    text, instr = _dockerfile(name)
    assert instr[0][0] == "FROM" and instr[0][1].startswith(base)
    copied = set()
    for k, v in instr:
        if k == "COPY":
            copied.update(v.split()[:-1])
    meta = tomllib.loads((ROOT / "pyproject.toml").read_text())
    assert {"pyproject.toml", meta["project"]["readme"], "xrnn"} <= copied
    assert all((ROOT / c).exists() for c in copied)
    installs = " ".join(v for k, v in instr if k == "RUN" and "pip install" in v)
    if extra:
        assert extra in installs and extra in meta["project"]["optional-dependencies"]
    assert "xrnn train" in " ".join(v for k, v in instr if k == "CMD").replace('", "', " ").replace('"', "")
    workdir = [v for k, v in instr if k == "WORKDIR"][-1]
    sub = build_parser()._subparsers._group_actions[0].choices["train"]
    out_default = next(a.default for a in sub._actions if "--out" in a.option_strings)
    assert isinstance(out_default, str) and out_default
    mounts = re.findall(r'-v "\$PWD/([^:]+):([^"]+)"', text)
    assert mounts and all(target == f"{workdir}/{out_default}" and host == out_default for host, target in mounts)
    readme = (ROOT / "README.md").read_text()
    assert f"docker build -f docker/{name}" in readme
    for _host, target in re.findall(r'-v "\$PWD/([^:]+):([^"]+)"', readme):
        assert target == f"{workdir}/{out_default}"


def _hint_files():
    for top in ("xrnn", "examples", "benchmarks", "docker", "docs", "tests"):
        for path in sorted((ROOT / top).rglob("*")):
            if path.is_file() and (path.suffix in (".py", ".md") or path.name.startswith("Dockerfile")):
                yield path
    yield ROOT / "README.md"


def test_install_hints_name_the_distribution_and_its_extras():
    """Every ``pip install`` hint names this project's distribution (``xrnn`` on PyPI is another
    project) and only extras that pyproject.toml defines, in the code, the examples, README and the
    Dockerfiles; README also says how to install from a checkout."""
    meta = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    name, extras = meta["name"], set(meta["optional-dependencies"])
    assert name != "xrnn" and meta["scripts"] == {"xrnn": "xrnn.cli:main"}
    seen = 0
    for path in _hint_files():
        text = path.read_text()
        if path.name == "test_project.py":
            continue
        # a distribution with extras: xrnn-array[cuda12], ".[plot]"
        for dist, ex in re.findall(r'(?<![\w.-])(xrnn[\w-]*|\.)\[([\w,\s]+)\]', text):
            if dist == "." and "pip install" not in text:
                continue
            assert dist in (name, "."), f"{path.relative_to(ROOT)}: {dist}[{ex}] should name {name!r}"
            assert {e.strip() for e in ex.split(",")} <= extras, f"{path.relative_to(ROOT)}: unknown extra in [{ex}]"
            seen += 1
        # any other spelling of a distribution with extras: a regex (xrnn\[plot\]), an f-string (xrnn[{extra}])
        for dist in re.findall(r'(?<![\w.-])(xrnn[\w-]*)\\?\[', text):
            assert dist == name, f"{path.relative_to(ROOT)}: {dist}[...] should name {name!r}"
        # a bare distribution: pip install -U xrnn-array
        for dist in re.findall(r'pip install (?:-U |--upgrade )?["\']?(xrnn[\w-]*)\b(?![\[\w-])', text):
            assert dist == name, f"{path.relative_to(ROOT)}: 'pip install {dist}' should name {name!r}"
            seen += 1
    assert seen >= 10
    readme = (ROOT / "README.md").read_text()
    assert 'pip install ".[cuda12]"' in readme and f'pip install "{name}[cuda12]"' in readme


PUBLIC_MODULES = ["xrnn", "xrnn.backend", "xrnn.callbacks", "xrnn.checkpoint", "xrnn.cli", "xrnn.data",
                  "xrnn.distributed", "xrnn.errors", "xrnn.functional", "xrnn.gradcheck", "xrnn.kernels",
                  "xrnn.keras_io", "xrnn.keras_optim", "xrnn.layers", "xrnn.losses", "xrnn.models",
                  "xrnn.modules", "xrnn.optim", "xrnn.rundir", "xrnn.sampling", "xrnn.segments", "xrnn.sequential",
                  "xrnn.threads", "xrnn.train"]


def test_every_module_is_listed_as_public():
    found = {".".join(p.relative_to(ROOT).with_suffix("").parts) for p in (ROOT / "xrnn").rglob("*.py")}
    found = {m.removesuffix(".__init__") for m in found}
    private = {"xrnn.__main__", "xrnn.kernels.numpy_fast", "xrnn.kernels.numpy_step", "xrnn.kernels.cupy_fast"}
    found = {m for m in found - private if not m.rsplit(".", 1)[-1].startswith("_")}  # _typing, _version
    assert found == set(PUBLIC_MODULES)


@pytest.mark.parametrize("name", PUBLIC_MODULES)
def test_public_modules_offer_only_their_public_names(name):
    """``from xrnn.layers import *`` gives the layers, not F, M, Any or the error classes: each module
    lists its names in ``__all__``, every listed name exists, is unique, and is the module's own
    (no typing names, no imported library objects, no modules except the package's submodules,
    error classes only from xrnn.errors)."""
    import importlib
    import types

    import xrnn.errors

    mod = importlib.import_module(name)
    assert isinstance(getattr(mod, "__all__", None), list), f"{name} has no __all__"
    names = mod.__all__
    assert len(names) == len(set(names)), f"{name}.__all__ repeats a name"
    error_classes = {getattr(xrnn.errors, n) for n in xrnn.errors.__all__}
    for n in names:
        assert hasattr(mod, n), f"{name}.__all__ lists {n!r}, which does not exist"
        obj = getattr(mod, n)
        if isinstance(obj, types.ModuleType):
            assert name == "xrnn" and obj.__name__ == f"xrnn.{n}", f"{name}.__all__ offers the module {n!r}"
            continue
        origin = getattr(obj, "__module__", None) or ""
        if isinstance(obj, (type, types.FunctionType)):
            assert origin.startswith("xrnn"), f"{name}.__all__ offers {n!r} from {origin}"
        assert origin not in ("typing", "collections.abc", "builtins"), f"{name}.__all__ offers {n!r}"
        if name != "xrnn.errors":
            assert not any(obj is e for e in error_classes), f"{name}.__all__ offers the error class {n!r} (it is xrnn.errors')"
    for internal in ("F", "M", "Any", "np", "math", "os", "annotations"):
        assert internal not in names
    star: dict = {}
    exec(f"from {name} import *", star)
    assert set(star) - {"__builtins__"} == set(names)


def _readme_python(section: str) -> str:
    text = (ROOT / "README.md").read_text()
    body = text.split(f"## {section}", 1)[1].split("\n## ", 1)[0]
    blocks = re.findall(r"```python\n(.*?)\n```", body, re.S)
    assert len(blocks) == 1, section
    return blocks[0]


@pytest.mark.parametrize("section,shrink,written", [
    ("A short tour", {"range(100)": "range(2)"}, ["shakespeare.ckpt"]),
    ("Keras-style models", {"epochs=20": "epochs=3"}, ["forecast.ckpt", "forecast-best.ckpt"]),
])
def test_readme_snippets_run_as_written_on_a_cpu_only_machine(section, shrink, written, tmp_path, monkeypatch,
                                                                capsys):
    """Both README snippets run on a laptop as printed (device="auto" falls back to the CPU, every name
    is defined); only their step counts are shrunk here (the tour says so in a comment)."""
    code = _readme_python(section)
    assert 'device="cuda"' not in code
    for old, new in shrink.items():
        assert code.count(old) == 1, old
        code = code.replace(old, new)
    monkeypatch.chdir(tmp_path)
    exec(compile(code, f"README.md ({section})", "exec"), {"__name__": "__readme__"})
    for name in written:
        assert (tmp_path / name).is_file(), name
    out = capsys.readouterr().out
    if section == "A short tour":
        assert out.startswith("ROMEO:") and ("no usable GPU" in out or "using GPU" in out)
    else:
        assert "['learning_rate', 'loss', 'mae', 'val_loss', 'val_mae']" in out
