"""benchmarks/processes.py: a fork that becomes `python -m MODULE ARGS` behaves as the fresh process
would (arguments, environment, folder, output, exit status), stops with its children, and reads
the benchmarks' environment afresh."""

import os
import subprocess
import sys
import textwrap
import time

import pytest

from benchmarks import processes

PROBE = textwrap.dedent("""
    import json, os, sys, time
    from pathlib import Path

    import benchmarks.common

    if sys.argv[1] == "report":
        print(json.dumps({"argv": sys.argv[1:], "cwd": os.getcwd(), "name": __name__,
                          "greeting": os.environ.get("GREETING"), "results": str(benchmarks.common.RESULTS)}))
        print("to stderr", file=sys.stderr)
    elif sys.argv[1] == "exit":
        sys.exit(int(sys.argv[2]))
    elif sys.argv[1] == "refuse":
        sys.exit("a message")
    elif sys.argv[1] == "raise":
        raise RuntimeError("broken")
    elif sys.argv[1] == "sleep":   # with a child of its own, which must stop with it
        import subprocess
        child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
        Path(sys.argv[2]).write_text(str(child.pid))
        time.sleep(60)
""")


@pytest.fixture
def probe(tmp_path, monkeypatch):
    (tmp_path / "probe_module.py").write_text(PROBE)
    monkeypatch.syspath_prepend(str(tmp_path))
    return processes.module_command("probe_module")


def forked(command, tmp_path, *arguments, env=None, stderr=None):
    output = open(tmp_path / "out.txt", "w+")
    child = processes.start([*command, *arguments], fork=True, cwd=tmp_path, env=env, stdout=output,
                            stderr=output if stderr is None else stderr)
    return child, output


def test_the_fork_runs_the_module_as_main_with_its_arguments_environment_and_folder(probe, tmp_path):
    import json

    import benchmarks.common   # imported here with this process's results folder

    child, output = forked(probe, tmp_path, "report", "x", env={**os.environ, "GREETING": "hello",
                                                               "BENCHMARK_RESULTS": str(tmp_path / "r")},
                           stderr=subprocess.STDOUT)
    assert child.wait(60) == 0 and child.returncode == 0 and child.poll() == 0
    output.seek(0)
    lines = output.read().splitlines()
    report = json.loads(lines[0])
    assert report == {"argv": ["report", "x"], "cwd": str(tmp_path), "name": "__main__", "greeting": "hello",
                      "results": str(tmp_path / "r")}   # the benchmarks' modules imported afresh in the fork
    assert benchmarks.common.RESULTS != tmp_path / "r"
    assert lines[1] == "to stderr"


@pytest.mark.parametrize("arguments, status, said", [
    (["exit", "3"], 3, ""),
    (["refuse"], 1, "a message"),
    (["raise"], 1, "RuntimeError: broken"),
], ids=["exit-status", "exit-message", "exception"])
def test_the_exit_status_is_the_modules(probe, tmp_path, arguments, status, said):
    child, output = forked(probe, tmp_path, *arguments)
    assert child.wait(60) == status
    output.seek(0)
    assert said in output.read()


def test_a_fork_past_its_timeout_is_killed_with_its_children(probe, tmp_path):
    pid_file = tmp_path / "grandchild.pid"
    child, _ = forked(probe, tmp_path, "sleep", str(pid_file))
    with pytest.raises(subprocess.TimeoutExpired):
        child.wait(0.2)
    deadline = time.monotonic() + 60
    while not pid_file.exists() or not pid_file.read_text():
        assert time.monotonic() < deadline
        time.sleep(0.05)
    grandchild = int(pid_file.read_text())
    child.kill()
    assert child.wait(10) == -9
    deadline = time.monotonic() + 10
    while process_alive(grandchild):
        assert time.monotonic() < deadline, "the fork's own child outlived it"
        time.sleep(0.05)


def process_alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as stat:
            return stat.read().split(") ")[1][0] != "Z"   # a zombie has stopped
    except FileNotFoundError:
        return False


def test_without_fork_it_is_a_plain_process_and_only_module_commands_fork(tmp_path):
    plain = processes.start([sys.executable, "-c", "print('plain')"], fork=False, cwd=tmp_path,
                            stdout=subprocess.DEVNULL)
    assert isinstance(plain, subprocess.Popen) and plain.wait(60) == 0
    with pytest.raises(ValueError, match="only `python -m MODULE` forks"):
        processes.start([sys.executable, "-c", "print()"], fork=True, cwd=tmp_path)
    with pytest.raises(subprocess.CalledProcessError):
        processes.run(processes.module_command("json.tool", str(tmp_path / "missing.json")), fork=True, cwd=tmp_path)
