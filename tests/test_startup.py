"""Start-up of the sampling path: what ``xrnn sample`` imports.

``array_api_compat.numpy`` copies every NumPy attribute into its namespace,
which would import numpy.testing and numpy.f2py (together more time than
``import numpy``); :func:`xrnn.backend._import_numpy_namespace` leaves them out
and restores NumPy's own listing. Each check runs in a fresh interpreter,
since the test process has imported much more already.
"""

import os
import subprocess
import sys
import textwrap

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _run(code: str) -> str:
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    out = subprocess.run([sys.executable, "-c", textwrap.dedent(code)], env=env, cwd=ROOT, capture_output=True,
                         text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    return out.stdout


def test_cpu_device_does_not_import_numpy_testing_or_f2py():
    out = _run("""
        import sys
        import xrnn
        dev = xrnn.resolve_device("cpu")
        x = dev.asarray([3.0, 1.0, 2.0], dtype="float32")
        print(float(dev.xp.sum(dev.xp.cumulative_sum(x))))
        print(sorted(m for m in ("numpy.testing", "numpy.f2py", "numpy.ma", "numpy.polynomial") if m in sys.modules))
        import numpy
        print("testing" in dir(numpy), "testing" in numpy.__all__, numpy.testing.assert_allclose.__name__)
    """).splitlines()
    assert out[0] == "13.0"
    assert out[1] == "[]"
    assert out[2] == "True True assert_allclose"
