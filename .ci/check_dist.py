"""Check what `python -m build` made: usage `python .ci/check_dist.py DIST_DIR`.

Finds the one wheel and the one sdist in DIST_DIR (whatever the distribution is
named) and checks, against this checkout:

- the wheel holds every module of the xrnn package, the embedded corpus and
  ``py.typed``, and nothing outside ``xrnn/`` and its ``.dist-info`` (no tests,
  benchmarks, examples);
- its metadata carries the version written in ``xrnn/_version.py`` (the one
  place it is written), ``Requires-Python: >=3.10`` and the 3.10-3.13 classifiers;
- the sdist holds the same package files plus what the test suite needs
  (tests/conftest.py, examples, benchmarks, docs), and no build litter.

Exits 1 with one line per problem, 0 with a summary. Standard library only.
"""

from __future__ import annotations

import ast
import email.parser
import sys
import tarfile
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PYTHONS = ("3.10", "3.11", "3.12", "3.13")


def source_version() -> str:
    """The version literal in xrnn/_version.py, read without importing xrnn."""
    tree = ast.parse((ROOT / "xrnn" / "_version.py").read_text(encoding="utf-8"))
    for node in tree.body:
        if isinstance(node, ast.Assign) and any(getattr(t, "id", None) == "__version__" for t in node.targets):
            return str(ast.literal_eval(node.value))
    raise SystemExit("xrnn/_version.py defines no __version__")


def package_files() -> set[str]:
    """Every file the wheel must hold, as POSIX paths relative to the repository root."""
    pkg = ROOT / "xrnn"
    want = {p.relative_to(ROOT).as_posix() for p in pkg.rglob("*.py")}
    want |= {p.relative_to(ROOT).as_posix() for p in (pkg / "corpus").glob("*.txt")}
    want |= {p.relative_to(ROOT).as_posix() for p in (pkg / "kernels" / "cpu").glob("*.[ch]")}
    want.add("xrnn/py.typed")
    return want


def check_wheel(path: Path, version: str) -> list[str]:
    problems = []
    with zipfile.ZipFile(path) as z:
        names = set(z.namelist())
        info = [n for n in names if n.endswith(".dist-info/METADATA")]
        meta = email.parser.Parser().parsestr(z.read(info[0]).decode()) if len(info) == 1 else None
    for missing in sorted(package_files() - names):
        problems.append(f"wheel lacks {missing}")
    for extra in sorted(n for n in names if not (n.startswith("xrnn/") or n.split("/")[0].endswith(".dist-info"))):
        problems.append(f"wheel holds {extra}, which is not part of the xrnn package")
    # the fused CPU kernels, built by setup.py wherever a C compiler is (CI's machines have one)
    if not any(n.startswith("xrnn/kernels/_xrnn_cpu") for n in names):
        problems.append("wheel lacks the compiled kernels xrnn/kernels/_xrnn_cpu* (was there no C compiler?)")
    if meta is None:
        return problems + ["wheel has no single .dist-info/METADATA"]
    if meta["Version"] != version:
        problems.append(f"wheel metadata says version {meta['Version']}, xrnn/_version.py says {version}")
    if meta["Requires-Python"] != ">=3.10":
        problems.append(f"wheel Requires-Python is {meta['Requires-Python']!r}, expected '>=3.10'")
    classifiers = set(meta.get_all("Classifier") or [])
    for v in PYTHONS:
        if f"Programming Language :: Python :: {v}" not in classifiers:
            problems.append(f"wheel metadata lacks the Python {v} classifier")
    if "Typing :: Typed" not in classifiers:
        problems.append("wheel metadata lacks the 'Typing :: Typed' classifier")
    return problems


def check_sdist(path: Path, version: str) -> list[str]:
    problems = []
    with tarfile.open(path) as t:
        names = {n.split("/", 1)[1] for n in t.getnames() if "/" in n}
    need = package_files() | {"pyproject.toml", "README.md", "CHANGELOG.md", "CONTRIBUTING.md", "PKG-INFO",
                              "tests/conftest.py", "tests/test_project.py", "docs/architecture.md",
                              "examples/README.md", "benchmarks/bench.py", "setup.py"}
    for missing in sorted(need - names):
        problems.append(f"sdist lacks {missing}")
    litter = [n for n in names if "__pycache__" in n or n.endswith((".pyc", ".ckpt")) or n.startswith(".venv")]
    for junk in sorted(litter):
        problems.append(f"sdist holds build litter {junk}")
    if not path.name.endswith(f"-{version}.tar.gz"):
        problems.append(f"sdist {path.name} is not named for version {version}")
    return problems


def main(argv: list[str]) -> int:
    if len(argv) != 1:
        print(__doc__.strip().splitlines()[0], file=sys.stderr)
        return 2
    dist = Path(argv[0])
    wheels, sdists = sorted(dist.glob("*.whl")), sorted(dist.glob("*.tar.gz"))
    if len(wheels) != 1 or len(sdists) != 1:
        print(f"check_dist: expected one wheel and one sdist in {dist}, found {wheels + sdists}", file=sys.stderr)
        return 1
    version = source_version()
    problems = check_wheel(wheels[0], version) + check_sdist(sdists[0], version)
    for p in problems:
        print(f"check_dist: {p}", file=sys.stderr)
    if problems:
        return 1
    print(f"check_dist: {wheels[0].name} and {sdists[0].name} hold what they should (version {version})")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
