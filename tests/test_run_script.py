"""megamoe.testing.scripts.run_script, which the CLI tests use in place of a new interpreter:
the script's argv, environment, working directory, output, atexit handlers and exit code are
those of ``python script ...``, checked against a real ``subprocess.run`` of the same script."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest

from megamoe.testing.scripts import run_script

SCRIPT = textwrap.dedent("""
    import atexit, os, sys
    atexit.register(lambda: print("atexit ran", flush=True))
    print("argv", sys.argv[1:], "cwd", os.path.basename(os.getcwd()), "env", os.environ.get("PROBE"))
    print("path0", os.path.basename(sys.path[0]), "main", __name__)
    os.write(2, b"raw stderr\\n")
    how = sys.argv[1]
    if how == "exit":
        sys.exit(int(sys.argv[2]))
    if how == "raise":
        raise ValueError("boom")
    if how == "message":
        sys.exit("a message")
""")


@pytest.mark.parametrize("argv", [["ok"], ["exit", "3"], ["raise"], ["message"]])
def test_a_script_runs_as_a_fresh_interpreter_would(tmp_path, argv):
    script = tmp_path / "scripts" / "probe.py"
    script.parent.mkdir()
    script.write_text(SCRIPT)
    work = tmp_path / "work"
    work.mkdir()
    env = {"PATH": "/usr/bin:/bin", "PROBE": "42"}
    got = run_script(str(script), *argv, cwd=work, env=env)
    want = subprocess.run([sys.executable, str(script), *argv], cwd=work, env=env, capture_output=True, text=True)
    assert got.returncode == want.returncode
    assert got.stdout == want.stdout
    assert ("atexit ran" in got.stdout) and ("argv" in got.stdout) and "path0 scripts main __main__" in got.stdout
    # the traceback's frames differ (runpy's) but its first and last lines are the interpreter's
    assert got.stderr.splitlines()[0] == want.stderr.splitlines()[0]
    assert got.stderr.splitlines()[-1] == want.stderr.splitlines()[-1]
