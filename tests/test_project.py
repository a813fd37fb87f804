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
                  "xrnn.kernels.native",
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
            assert not any(obj is e for e in error_classes), \
                f"{name}.__all__ offers the error class {n!r} (it is xrnn.errors')"
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


# ---------------------------------------------------------------------------
# one version; a wheel a user can trust


def _check_dist():
    import importlib.util

    spec = importlib.util.spec_from_file_location("check_dist", ROOT / ".ci" / "check_dist.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_version_is_written_once_and_read_everywhere(tmp_path, capsys):
    """xrnn/_version.py holds the version; the package metadata, ``xrnn.__version__``, the CLI's
    ``--version`` and a checkpoint's header all read it, and no other module writes one."""
    import importlib.metadata

    import xrnn
    from xrnn._version import __version__ as written
    from xrnn.cli import main

    assert re.fullmatch(r"\d+\.\d+\.\d+((a|b|rc)\d+)?(\.dev\d+)?", written), written
    meta = tomllib.loads((ROOT / "pyproject.toml").read_text())
    assert "version" not in meta["project"] and "version" in meta["project"]["dynamic"]
    assert meta["tool"]["setuptools"]["dynamic"]["version"] == {"attr": "xrnn._version.__version__"}
    assert _check_dist().source_version() == written  # what the dist check compares the wheel with
    assert xrnn.__version__ == written
    for path in sorted((ROOT / "xrnn").rglob("*.py")):
        if path.name != "_version.py":
            src = path.read_text()
            assert not re.search(r"^\s*__version__\s*=", src, re.M), f"{path} writes a version of its own"
            assert f'"{written}"' not in src and f"'{written}'" not in src, f"{path} repeats the version literal"

    with pytest.raises(SystemExit) as e:
        main(["--version"])
    assert e.value.code == 0
    assert capsys.readouterr().out.strip() == f"xrnn {written}"

    model = xrnn.CharLM(3, hidden_size=2, seed=0)
    xrnn.save(model, tmp_path / "m.ckpt")
    assert xrnn.peek(tmp_path / "m.ckpt").xrnn_version == written

    try:  # installed (CI installs this checkout before running the suite): the metadata agrees
        installed = importlib.metadata.version(meta["project"]["name"])
    except importlib.metadata.PackageNotFoundError:
        installed = None  # run from a checkout that is not installed: pyproject's attr above is the link
    if installed is not None:
        assert installed == written


def _fake_dist(tmp_path, check, version, drop=(), add=()):
    """A wheel and an sdist shaped like setuptools' output, made from this checkout's package files."""
    import io
    import tarfile
    import zipfile

    dist = tmp_path / "dist"
    dist.mkdir(parents=True)
    kernels = "xrnn/kernels/_xrnn_cpu.cpython-311-x86_64-linux-gnu.so"  # what setup.py builds
    files = (check.package_files() | {kernels}) - set(drop) | set(add)
    meta = "\n".join(["Metadata-Version: 2.4", "Name: xrnn-any-name", f"Version: {version}",
                      "Requires-Python: >=3.10", "Classifier: Typing :: Typed"]
                     + [f"Classifier: Programming Language :: Python :: {v}" for v in check.PYTHONS]) + "\n"
    with zipfile.ZipFile(dist / f"any_name-{version}-py3-none-any.whl", "w") as z:
        for f in sorted(files):
            z.writestr(f, "")
        z.writestr(f"any_name-{version}.dist-info/METADATA", meta)
    extra = {"pyproject.toml", "README.md", "CHANGELOG.md", "CONTRIBUTING.md", "PKG-INFO", "tests/conftest.py",
             "tests/test_project.py", "docs/architecture.md", "examples/README.md", "benchmarks/bench.py",
             "setup.py"}
    with tarfile.open(dist / f"any-name-{version}.tar.gz", "w:gz") as t:
        for f in sorted(files | extra):
            info = tarfile.TarInfo(f"any-name-{version}/{f}")
            t.addfile(info, io.BytesIO(b""))
    return dist


def test_dist_check_accepts_a_good_wheel_and_names_what_is_wrong(tmp_path, capsys):
    """.ci/check_dist.py (run by CI on the built wheel and sdist) passes a complete pair and
    fails, naming the file, on a missing py.typed or corpus, on tests or benchmarks in the wheel."""
    check = _check_dist()
    version = check.source_version()
    assert "xrnn/py.typed" in check.package_files()
    assert "xrnn/corpus/tinyshakespeare.txt" in check.package_files()
    assert "xrnn/kernels/numpy_fast.py" in check.package_files()
    assert check.main([str(_fake_dist(tmp_path / "good", check, version))]) == 0
    for case, kw, needle in [
        ("typed", dict(drop=["xrnn/py.typed"]), "wheel lacks xrnn/py.typed"),
        ("corpus", dict(drop=["xrnn/corpus/tinyshakespeare.txt"]), "wheel lacks xrnn/corpus/tinyshakespeare.txt"),
        ("tests", dict(add=["tests/test_cells.py"]), "wheel holds tests/test_cells.py"),
        ("bench", dict(add=["benchmarks/bench.py"]), "wheel holds benchmarks/bench.py"),
        ("kernels", dict(drop=["xrnn/kernels/_xrnn_cpu.cpython-311-x86_64-linux-gnu.so"]),
         "wheel lacks the compiled kernels"),
        ("source", dict(drop=["xrnn/kernels/cpu/recurrent.c"]), "wheel lacks xrnn/kernels/cpu/recurrent.c"),
    ]:
        capsys.readouterr()
        assert check.main([str(_fake_dist(tmp_path / case, check, version, **kw))]) == 1, case
        assert needle in capsys.readouterr().err, case
    capsys.readouterr()
    assert check.main([str(_fake_dist(tmp_path / "old", check, "0.0.1"))]) == 1
    assert f"says version 0.0.1, xrnn/_version.py says {version}" in capsys.readouterr().err


def test_built_wheel_and_sdist_hold_what_they_should(tmp_path):
    """Build both from a copy of this checkout with the build backend installed here (CI builds
    in isolation and runs the same check); skip where ``build`` or the backend is missing."""
    import importlib.metadata
    import shutil
    import subprocess
    import sys

    try:  # by its metadata: after `pip install .` the checkout's build/ folder imports as "build" too
        importlib.metadata.version("build")
    except importlib.metadata.PackageNotFoundError:
        pytest.skip("the 'build' package is not installed here")
    setuptools = pytest.importorskip("setuptools")
    meta = tomllib.loads((ROOT / "pyproject.toml").read_text())
    (need,) = [r for r in meta["build-system"]["requires"] if r.startswith("setuptools")]
    floor = tuple(int(p) for p in need.split(">=")[1].split("."))
    if tuple(int(p) for p in setuptools.__version__.split(".")[:len(floor)]) < floor:
        pytest.skip(f"{need} is not installed here (setuptools {setuptools.__version__})")
    src = tmp_path / "src"
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc", "*.egg-info", "build", "dist", ".venv*", "runs")
    for name in ("xrnn", "tests", "examples", "benchmarks", "docs", "docker", ".ci"):
        shutil.copytree(ROOT / name, src / name, ignore=ignore)
    for name in ("pyproject.toml", "setup.py", "README.md", "MANIFEST.in", "CHANGELOG.md", "CONTRIBUTING.md"):
        if (ROOT / name).exists():
            shutil.copy2(ROOT / name, src / name)
    r = subprocess.run([sys.executable, "-m", "build", "--no-isolation", "--outdir", str(tmp_path / "dist"), str(src)],
                       capture_output=True, text=True, timeout=300, cwd=tmp_path)  # not the checkout's build/
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    r = subprocess.run([sys.executable, str(src / ".ci" / "check_dist.py"), str(tmp_path / "dist")],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr


def test_changelog_keeps_a_changelog_and_names_this_version():
    """Keep-a-Changelog form: an Unreleased section first, then one dated section per version,
    newest first, the package's version among them; CONTRIBUTING says how to run what CI runs."""
    from xrnn._version import __version__

    text = (ROOT / "CHANGELOG.md").read_text()
    heads = re.findall(r"^## (.+)$", text, re.M)
    assert heads[0] == "[Unreleased]", heads
    versions = [re.fullmatch(r"\[(\d+\.\d+\.\d+)\] - \d{4}-\d{2}-\d{2}", h) for h in heads[1:]]
    assert all(versions), heads
    numbers = [tuple(map(int, m.group(1).split("."))) for m in versions]
    assert numbers == sorted(numbers, reverse=True) and __version__ in [m.group(1) for m in versions]
    allowed = {"Added", "Changed", "Deprecated", "Removed", "Fixed", "Security"}
    assert set(re.findall(r"^### (.+)$", text, re.M)) <= allowed
    guide = (ROOT / "CONTRIBUTING.md").read_text()
    assert _readme_commands()[1] in guide
    for needle in ("ruff check", "mypy", "benchmarks/bench.py", "benchmarks/gpu_check.sh", "tests/test_kernels.py"):
        assert needle in guide, needle


def test_public_functions_and_methods_are_annotated():
    """py.typed promises annotations: every public function and method of xrnn (names without a
    leading underscore, in public classes, plus ``__init__``/``__call__``) annotates every
    parameter but self/cls, and its return (except ``__init__``). mypy checks that they hold."""
    import ast

    missing = []
    for path in sorted((ROOT / "xrnn").rglob("*.py")):
        def visit(body, prefix, public):
            for node in body:
                if isinstance(node, ast.ClassDef):
                    visit(node.body, prefix + node.name + ".", public and not node.name.startswith("_"))
                elif isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                    if not public or (node.name.startswith("_") and node.name not in ("__init__", "__call__")):
                        continue
                    a = node.args
                    params = a.posonlyargs + a.args + a.kwonlyargs + [p for p in (a.vararg, a.kwarg) if p]
                    bare = [p.arg for p in params if p.annotation is None and p.arg not in ("self", "cls")]
                    if node.returns is None and node.name != "__init__":
                        bare.append("return")
                    if bare:
                        missing.append(f"{path.relative_to(ROOT)}:{node.lineno} {prefix}{node.name}: {bare}")

        visit(ast.parse(path.read_text()).body, "", True)
    assert not missing, "unannotated public API:\n" + "\n".join(missing)
    assert (ROOT / "xrnn" / "py.typed").exists()
    typing_src = (ROOT / "xrnn" / "_typing.py").read_text()
    assert not re.search(r"^\s*(import|from)\s+(numpy|cupy|torch|array_api)", typing_src, re.M)
