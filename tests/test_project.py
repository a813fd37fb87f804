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
