"""The python tool's sandbox: normal code works; escapes, bombs and hangs become typed tool errors."""

from __future__ import annotations

import socket
import time
import uuid
from pathlib import Path

import pytest

from opd_agents.env.tool import Tool, ToolBox
from opd_agents.types import ErrorType, ToolCall, ToolResult
from tools.python_exec import BOOT_FILE, SANDBOX_BOOT, make_python_tool, python


def run(code: str, tool: Tool = python) -> ToolResult:
    return ToolBox([tool]).execute([ToolCall(name="python", arguments={"code": code})])[0]


def assert_blocked(result: ToolResult, detail: str) -> None:
    assert result.error_type is ErrorType.execution_failed, result.content
    assert result.content.startswith("Tool execution failed: CodeError:")
    assert detail in result.content, result.content


def sandbox_processes() -> list[str]:
    out = []
    for cmdline in Path("/proc").glob("[0-9]*/cmdline"):
        try:
            text = cmdline.read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:  # the process ended while we looked
            continue
        if BOOT_FILE in text or SANDBOX_BOOT in text:
            out.append(text)
    return out


def test_prints_output_and_keeps_stdlib() -> None:
    result = run("import math, itertools, fractions, json\nprint(math.factorial(20))\nprint(json.dumps([1, 2]))")
    assert result.error_type is None
    assert result.content == "2432902008176640000\n[1, 2]"


def test_no_output_gets_a_hint() -> None:
    assert run("x = 1 + 1").content == "(no output; print() the values you need)"


def test_exception_is_execution_failed_with_the_traceback_tail() -> None:
    result = run("print('before')\nvalues = {}\nvalues['missing']")
    assert_blocked(result, "KeyError: 'missing'")
    assert 'File "main.py", line 3' in result.content  # the user's frame, not the bootstrap's
    assert "sandbox_boot" not in result.content


def test_exit_code_is_reported() -> None:
    assert_blocked(run("import os\nos._exit(3)"), "(exit code 3)")
    assert run("import sys\nprint('ok')\nsys.exit(0)").content == "ok"


def test_infinite_loop_times_out_and_the_process_group_dies() -> None:
    tool = make_python_tool(timeout_s=1.0)
    start = time.perf_counter()
    result = run("while True:\n    pass", tool)
    elapsed = time.perf_counter() - start
    assert result.error_type is ErrorType.timeout
    assert elapsed < 2.0
    deadline = time.monotonic() + 2.0
    while sandbox_processes() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert sandbox_processes() == []


@pytest.mark.parametrize("code", ["x = bytearray(10**10)", "x = []\nwhile True:\n    x.append(' ' * 10**6)"])
def test_memory_bomb_fails_and_host_is_fine(code: str) -> None:
    assert_blocked(run(code), "MemoryError")
    assert run("print(sum(range(10)))").content == "45"  # the next call is unaffected


def test_network_is_blocked() -> None:
    with socket.socket() as server:  # a real listener on the host: the child must not reach it
        server.bind(("127.0.0.1", 0))
        server.listen()
        server.setblocking(False)
        port = server.getsockname()[1]
        result = run(f"import socket\nsocket.create_connection(('127.0.0.1', {port}), timeout=1)")
        assert_blocked(result, "PermissionError: sandbox: socket")
        with pytest.raises(BlockingIOError):
            server.accept()
    assert_blocked(run("import urllib.request\nurllib.request.urlopen('http://example.com')"), "sandbox: socket")


def test_files_outside_the_workdir_are_blocked(tmp_path: Path) -> None:
    outside = tmp_path / f"escape-{uuid.uuid4().hex}.txt"
    assert_blocked(run(f"open({str(outside)!r}, 'w').write('x')"), "sandbox: writing")
    assert_blocked(run(f"import os\nos.mkdir({str(tmp_path / 'd')!r})"), "sandbox: os.mkdir")
    assert_blocked(run("import os\nos.remove('/tmp/../etc/hostname')"), "sandbox: os.remove")
    assert not outside.exists() and not (tmp_path / "d").exists()
    result = run("print(open('/etc/passwd').read())")
    assert_blocked(result, "sandbox: reading '/etc/passwd' is blocked")
    assert "root:" not in result.content
    assert_blocked(run("import os\nprint(os.listdir('/'))"), "sandbox: os.listdir")


def test_files_inside_the_workdir_work() -> None:
    code = ("import pathlib, tempfile, os\npathlib.Path('data').mkdir()\npathlib.Path('data/a.txt').write_text('hi')\n"
            "with tempfile.NamedTemporaryFile('w', delete=False) as f:\n    f.write('x')\n"
            "print(open('data/a.txt').read(), sorted(os.listdir('.')) == sorted(['data', 'main.py', "
            "os.path.basename(f.name)]))")
    result = run(code)
    assert result.error_type is None, result.content
    assert result.content == "hi True"


def test_host_environment_is_not_visible(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("OPD_SANDBOX_MARKER", "secret")
    result = run("import os\nprint(sorted(os.environ))\nprint(os.environ.get('OPD_SANDBOX_MARKER'))")
    assert result.content == "['HOME', 'LANG', 'PATH', 'PWD', 'TMPDIR']\nNone"


@pytest.mark.parametrize(("code", "detail"), [
    ("import os\nwhile True:\n    os.fork()", "os.fork is blocked"),
    ("import subprocess\nsubprocess.run(['sh', '-c', ':(){ :|:& };:'])", "subprocess.Popen is blocked"),
    ("import os\nos.system('echo hi')", "os.system is blocked"),
    ("import os\nos.execv('/bin/sh', ['sh'])", "os.exec is blocked"),
    ("import multiprocessing\nmultiprocessing.Process(target=print).start()", "blocked"),
    ("import _posixsubprocess\n_posixsubprocess.fork_exec()", "starting processes is blocked"),
    ("import ctypes", "import of 'ctypes' is blocked"),
    ("import os, signal\nos.kill(1, signal.SIGKILL)", "os.kill is blocked"),
    ("import resource\nresource.setrlimit(resource.RLIMIT_AS, (-1, -1))", "resource.setrlimit is blocked"),
    ("import sys\nsys.settrace(lambda *a: None)", "sys.settrace is blocked"),
    ("import gc\ngc.get_objects()", "gc.get_objects is blocked"),
    ("import os\nos.symlink('/etc/passwd', 'p')", "os.symlink is blocked"),
])
def test_processes_native_code_and_hook_tampering_are_blocked(code: str, detail: str) -> None:
    assert_blocked(run(code), detail)


def test_monkeypatching_builtins_does_not_disable_the_hook() -> None:
    code = ("import builtins, os\nbuiltins.isinstance = lambda *a: True\nbuiltins.str = bytes\n"
            "os.getcwd = lambda: '/etc'\ntry:\n    open('/etc/passwd')\nexcept PermissionError:\n    print('blocked')")
    assert run(code).content == "blocked"


def test_the_hook_cannot_be_rewritten_through_its_traceback_frame() -> None:
    # A refused call leaves the hook's frame in the traceback: its locals must offer nothing to mutate.
    code = """\
import os
try:
    open('/etc/passwd')
except PermissionError as e:
    tb = e.__traceback__
    while tb.tb_next:
        tb = tb.tb_next
    hook_locals = dict(tb.tb_frame.f_locals)
here = os.getcwd()
for value in hook_locals.values():
    try:
        value.clear()
    except (AttributeError, TypeError):
        pass
    if getattr(value, '__name__', '') == 'resolve':
        try:
            value.__defaults__ = (lambda p: here + '/x', lambda: here)
        except PermissionError:
            print('defaults refused')
try:
    open('/etc/passwd')
except PermissionError:
    print('still blocked')
"""
    assert run(code).content == "defaults refused\nstill blocked"


def test_relative_os_open_writes_need_absolute_paths() -> None:
    # os.open's dir_fd is not visible to the audit hook: a relative write could land in any directory.
    code = ("import os, sys\nfd = os.open(sys.path[1], os.O_RDONLY)\n"
            "os.open('evil.py', os.O_WRONLY | os.O_CREAT, dir_fd=fd)")
    assert_blocked(run(code), "sandbox: writing 'evil.py'")


def test_long_output_is_truncated_with_a_marker() -> None:
    result = run("print('x' * 100000)", make_python_tool(max_output_chars=200))
    assert result.error_type is None
    assert len(result.content) == 200 and result.content.endswith(" ... [truncated]")
    failing = run("print('x' * 100000)\n1 / 0", make_python_tool(max_output_chars=200))
    assert_blocked(failing, "ZeroDivisionError")  # the traceback at the end survives a long output
