"""``zwallet``'s product commands never import the benchmark package ``bench`` (nor, through it, PostgreSQL's
driver or matplotlib); ``zwallet bench`` imports it lazily and says how to get it when it is missing."""
from __future__ import annotations

import os
import subprocess
import sys
import textwrap

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PRODUCT_COMMANDS = ("node", "cluster", "status", "demo", "sim", "replica", "gateway")


def run_python(code: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=120, check=False)


def test_product_commands_do_not_import_bench():
    proc = run_python(f"""
        import contextlib, io, sys
        import engine.cli
        from engine.cli import COMMANDS, main
        def bench_modules():
            return sorted(m for m in sys.modules if m == "bench" or m.startswith("bench."))
        assert not bench_modules(), ("import engine.cli", bench_modules())
        with contextlib.redirect_stdout(io.StringIO()):
            assert main(["--help"]) == 0
        for command in {PRODUCT_COMMANDS!r}:
            assert command in COMMANDS, command
            out = io.StringIO()
            with contextlib.redirect_stdout(out), contextlib.redirect_stderr(out):
                try:
                    main([command, "--help"])
                except SystemExit as exc:          # argparse's --help
                    assert exc.code == 0, (command, exc.code, out.getvalue())
            assert "usage" in out.getvalue().lower(), (command, out.getvalue())
            assert not bench_modules(), (command, bench_modules())
        print("ok")
        """)
    assert proc.returncode == 0 and proc.stdout.strip() == "ok", proc.stdout + proc.stderr


def test_bench_command_without_bench_says_how_to_get_it():
    proc = run_python("""
        import sys
        sys.modules["bench"] = None                 # as if the bench/ package were not installed
        from engine.cli import main
        raise SystemExit(main(["bench", "--quick"]))
        """)
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert "Traceback" not in proc.stderr, proc.stderr
    assert "benchmark suite cannot be imported" in proc.stderr and ".[bench]" in proc.stderr, proc.stderr


def test_zwallet_help_lists_bench():
    proc = run_python("from engine.cli import main; raise SystemExit(main(['--help']))")
    assert proc.returncode == 0 and "bench" in proc.stdout, proc.stdout + proc.stderr
