"""Embedding from Cython/C: compile a tiny extension that cimports engine._ledger (the shipped .pxd and
ledger_core.h) and applies a batch without Python overhead per operation."""
import os
import shutil
import subprocess
import sys
import textwrap

import numpy as np
import pytest

import engine
from engine import Code, Ledger
from engine import records as R

HERE = os.path.dirname(__file__)


@pytest.fixture(scope="module")
def embed_module(tmp_path_factory):
    build = tmp_path_factory.mktemp("embed")
    shutil.copy(os.path.join(HERE, "embed_ext", "embed_demo.pyx"), build)
    engine_dir = os.path.dirname(engine.__file__)
    setup = textwrap.dedent(f"""
        import numpy
        from Cython.Build import cythonize
        from setuptools import Extension, setup
        ext = Extension("embed_demo", ["embed_demo.pyx"], language="c++",
                        include_dirs=[{engine_dir!r}, numpy.get_include()], extra_compile_args=["-std=c++17"])
        setup(ext_modules=cythonize([ext], include_path=[{os.path.dirname(engine_dir)!r}], quiet=True))
    """)
    (build / "setup.py").write_text(setup)
    proc = subprocess.run([sys.executable, "setup.py", "build_ext", "--inplace", "-q"], cwd=build,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]
    sys.path.insert(0, str(build))
    try:
        import embed_demo
        yield embed_demo
    finally:
        sys.path.remove(str(build))


def test_cython_extension_applies_a_batch_through_the_pxd(embed_module):
    led = Ledger()
    led.create_account(1, 1, "USD", lower_limit=None)
    led.create_account(2, 2, "USD")
    n = 1000
    ops = R.transfers(np.arange(100, 100 + n), np.ones(n, np.int64), np.full(n, 2), np.full(n, 3), "USD")
    results = np.zeros(n, dtype=R.RESULT_DTYPE)
    assert embed_module.apply_from_c(led, ops, results, 42) == n
    assert led.get_account(2)["available"] == 3 * n
    assert led.events(led.last_seq, led.last_seq)["timestamp"][0] == 42
    # the same records again are duplicates: exactly-once holds on the C path too
    assert embed_module.apply_from_c(led, ops, results, 43) == n
    assert (results["flags"] == R.ResultFlag.DUPLICATE).all() and led.get_account(2)["available"] == 3 * n


def test_malformed_batch_from_c_raises_and_applies_nothing(embed_module):
    led = Ledger()
    led.create_account(1, 1, "USD", lower_limit=None)
    before = led.digest()
    ops = R.empty_ops(2)
    ops["kind"] = 99
    with pytest.raises(ValueError, match="unknown operation kind"):
        embed_module.apply_from_c(led, ops, np.zeros(2, dtype=R.RESULT_DTYPE), 0)
    assert led.digest() == before and Code.OK == 0
