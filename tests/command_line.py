"""The command line as the tests run it: a real ``nnaccel`` process, or the same code in the test's own."""
import subprocess
import sys

from nnaccel import cli

NNACCEL = [sys.executable, "-m", "nnaccel.cli"]  # the command, in the interpreter that runs the tests


def nnaccel(*args, cwd=None, env=None, timeout=300):
    """``nnaccel ARGS`` run to its end as a process of its own: its CompletedProcess, output as text."""
    return subprocess.run([*NNACCEL, *map(str, args)], capture_output=True, text=True, cwd=cwd, env=env,
                          timeout=timeout)


def in_process(capsys, *args):
    """``(exit code, stdout, stderr)`` of the command line's code run in this process: no interpreter to
    start, for the tests where the process boundary is not what they check."""
    capsys.readouterr()
    code = cli.main([*map(str, args)])
    out, err = capsys.readouterr()
    return code, out, err
