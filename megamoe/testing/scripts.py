"""Run a repository script as the tests' ``subprocess.run([sys.executable, script, ...])`` would,
without paying for a new interpreter's imports.

Every such process spends about 4 s of CPU importing torch and megamoe before it reads its first
flag; the CPU tests launch dozens. :func:`run_script` forks the script's process from the
forkserver of the worker pools (:mod:`megamoe.testing.distributed`), which has imported both
once, and runs the script there as ``__main__`` with its own argv, environment, working
directory, stdout and stderr (files at the file-descriptor level, so C++ and child-process output
is captured too). Exit codes follow the interpreter's: ``sys.exit(n)``, 1 with a traceback on
stderr for an uncaught exception; atexit handlers run before the exit. The forkserver is single
threaded, so the fork is safe. Scripts that spawn their own ranks (torchrun) still go through
``subprocess``.
"""

from __future__ import annotations

import atexit
import os
import runpy
import subprocess
import sys
import tempfile
import traceback
from pathlib import Path
from typing import Optional

import torch

from megamoe.testing.distributed import preloaded_context


def _exit_code(exc: SystemExit) -> int:
    if exc.code is None:
        return 0
    if isinstance(exc.code, int):
        return exc.code
    print(exc.code, file=sys.stderr)
    return 1


def _script_main(script: str, argv: list[str], cwd: str, env: dict[str, str], out_path: str, err_path: str) -> None:
    """The forked process: the interpreter's ``python script argv...``, then exit with its code."""
    for fd, path in ((1, out_path), (2, err_path)):
        target = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        os.dup2(target, fd)
        os.close(target)
    os.chdir(cwd)
    os.environ.clear()
    os.environ.update(env)
    # the server imported torch under whatever OMP_NUM_THREADS its starter had: set the count a
    # fresh interpreter would take from this environment
    torch.set_num_threads(int(env.get("OMP_NUM_THREADS", 0)) or os.cpu_count() or 1)
    sys.argv = [script, *argv]
    sys.path[0:0] = [str(Path(script).resolve().parent)]  # as the interpreter puts the script's folder first
    try:
        runpy.run_path(script, run_name="__main__")
        code = 0
    except SystemExit as exc:
        code = _exit_code(exc)
    except BaseException:
        traceback.print_exc()
        code = 1
    try:
        atexit._run_exitfuncs()
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)


def run_script(script: str, *args: str, cwd: Optional[Path] = None, env: Optional[dict[str, str]] = None,
               timeout: float = 600.0) -> subprocess.CompletedProcess:
    """``subprocess.run([sys.executable, script, *args], cwd=cwd, env=env, capture_output=True,
    text=True, timeout=timeout)``, forked from the forkserver (see the module docstring)."""
    cwd = Path(cwd or os.getcwd())
    argv = list(args)
    with tempfile.TemporaryDirectory(prefix="megamoe-script-") as tmp:
        out, err = os.path.join(tmp, "stdout"), os.path.join(tmp, "stderr")
        proc = preloaded_context().Process(target=_script_main, daemon=False,
                                       args=(script, argv, str(cwd), dict(env if env is not None else os.environ),
                                             out, err))
        proc.start()
        proc.join(timeout)
        if proc.exitcode is None:
            proc.kill()
            proc.join()
            raise subprocess.TimeoutExpired([sys.executable, script, *argv], timeout)
        return subprocess.CompletedProcess([sys.executable, script, *argv], proc.exitcode,
                                           Path(out).read_text(errors="replace"), Path(err).read_text(errors="replace"))
