"""The escape suite: every attempt in tests/sandbox_attacks.py fails, with the OS sandbox alone (audit hook
off) and with both layers, and the "trainer" (a live host process, and this test process) stays alive and
responsive. Resource attacks (fork bombs, memory, disk, output, CPU) end as tool errors, leaving nothing
running."""

from __future__ import annotations

import asyncio
import os
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from opd_agents.errors import ConfigError, SandboxUnavailableError
from opd_agents.env.registry import make_env
from opd_agents.env.tool import ToolBox
from opd_agents.types import ErrorType, ToolCall
from tests.sandbox_attacks import ATTEMPTS, SECRET, Target, code_for
from tools import python_exec
from tools.python_exec import SandboxLimits, make_python_tool, os_sandbox_problem, require_sandbox, run_code

pytestmark = pytest.mark.skipif(os_sandbox_problem() is not None,
                                reason=f"no OS sandbox on this host: {os_sandbox_problem()}")
LAYERS = {"os-only": False, "os+hook": True}


@pytest.fixture(scope="module")
def target(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Target]:
    outside = tmp_path_factory.mktemp("host")
    secret = outside / "secret.txt"
    secret.write_text(SECRET)
    trainer = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"])
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen()
        listener.setblocking(False)
        yield Target(str(outside), str(secret), trainer.pid, listener.getsockname()[1])
        with pytest.raises(BlockingIOError):  # no connection ever reached the host listener
            listener.accept()
    assert trainer.poll() is None, "the trainer stand-in was killed"
    trainer.kill()
    trainer.wait()


def run(code: str, audit_hook: bool = True, **limits: float) -> str:
    """The sandbox's answer: its output, or the tool error's text."""
    try:
        return asyncio.run(run_code(code, SandboxLimits(**limits), audit_hook=audit_hook))
    except (python_exec.CodeError, TimeoutError) as e:
        return f"{type(e).__name__}: {e}"


def sandbox_processes() -> list[int]:
    pids = []
    for cmdline in Path("/proc").glob("[0-9]*/cmdline"):
        try:
            if python_exec.SANDBOX_BOOT.encode() in cmdline.read_bytes():
                pids.append(int(cmdline.parent.name))
        except OSError:  # it ended while we looked
            continue
    return pids


def wait_no_sandbox_processes(timeout_s: float = 3.0) -> list[int]:
    deadline = time.monotonic() + timeout_s
    while (left := sandbox_processes()) and time.monotonic() < deadline:
        time.sleep(0.05)
    return left


@pytest.mark.parametrize("layer", LAYERS)
@pytest.mark.parametrize("attempt", ATTEMPTS)
def test_escape_attempt_fails_and_the_host_is_untouched(attempt: str, layer: str, target: Target) -> None:
    out = run(code_for(attempt, target), audit_hook=LAYERS[layer])
    assert "ESCAPED" not in out and out.startswith("blocked:"), out
    assert SECRET not in out
    # The host side, whatever the code printed:
    assert Path(target.secret).read_text() == SECRET
    assert sorted(os.listdir(target.outside)) == ["secret.txt"]
    assert not Path("/dev/shm/opd-escape").exists()
    os.kill(target.trainer_pid, 0)  # still alive (raises if not)
    assert run("print(6 * 7)") == "42"  # the sandbox still answers


@pytest.mark.parametrize("layer", LAYERS)
@pytest.mark.parametrize(("name", "code"), [
    ("fork bomb", "import os\nwhile True:\n    os.fork()"),
    ("thread bomb", "import threading, time\nwhile True:\n    threading.Thread(target=time.sleep, args=(60,)).start()"),
    ("memory bomb", "x = []\nwhile True:\n    x.append(bytearray(10**7))"),
    ("fill the disk", "with open('big', 'wb') as f:\n    while True:\n        f.write(b'x' * 10**6)"),
    ("many files", "i = 0\nwhile True:\n    open(f'f{i}', 'w').write('x' * 4096)\n    i += 1"),
    ("CPU spin in C", "sum(range(10**12))"),
])
def test_resource_attacks_end_as_tool_errors(name: str, code: str, layer: str) -> None:
    start = time.perf_counter()
    out = run(code, audit_hook=LAYERS[layer], timeout_s=3.0)
    assert time.perf_counter() - start < 6.0, out
    assert out.startswith(("CodeError", "TimeoutError")), out
    assert wait_no_sandbox_processes() == []
    assert run("print(6 * 7)") == "42"


def test_huge_output_is_cut_without_buffering_it() -> None:
    start = time.perf_counter()
    out = run("import sys\nfor _ in range(200):\n    sys.stdout.write('x' * 10**6)", max_output_chars=100)
    assert time.perf_counter() - start < 10.0
    assert len(out) == 100 and out.endswith(" ... [truncated]")


def test_inherited_host_fds_are_not_visible(target: Target) -> None:
    fd = os.open(target.secret, os.O_RDONLY)
    os.set_inheritable(fd, True)  # even an fd the trainer marked inheritable stays outside
    try:
        out = run("import os\nprint(sorted(os.listdir('/proc/self/fd')))", audit_hook=False)
    finally:
        os.close(fd)
    assert out == "['0', '1', '2', '3']"  # stdin, stdout, stderr, and listdir's own


def test_the_sandbox_runs_as_nobody_without_capabilities_or_network() -> None:
    code = ("import os\nstatus = dict(l.split(':', 1) for l in open('/proc/self/status'))\n"
            "print(os.getuid(), os.getgid(), status['CapEff'].strip(), os.getpid() < 10,\n"
            "      [l.split(':')[0].strip() for l in open('/proc/net/dev').readlines()[2:]])")
    assert run(code, audit_hook=False) == "65534 65534 0000000000000000 True ['lo']"


def test_a_host_without_the_os_sandbox_refuses_unless_unsafe(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(python_exec, "os_sandbox_problem", lambda: "the kernel refused a user namespace")
    with pytest.raises(SandboxUnavailableError, match="the kernel refused a user namespace.*sandbox=unsafe"):
        require_sandbox("os")
    with pytest.warns(UserWarning, match="unsafe"):
        require_sandbox("unsafe")
    unsafe = make_python_tool(sandbox="unsafe")
    result = ToolBox([unsafe]).execute([ToolCall(name="python", arguments={"code": "print(6 * 7)"})])[0]
    assert (result.error_type, result.content) == (None, "42")
    refused = ToolBox([make_python_tool()]).execute([ToolCall(name="python", arguments={"code": "print(1)"})])[0]
    assert refused.error_type is ErrorType.execution_failed and "SandboxUnavailableError" in refused.content
    # The env refuses at construction, before any episode runs; a wrong mode is a config error.
    with pytest.raises(SandboxUnavailableError, match="user namespace"):
        make_env("opd_agents/PythonMath-v0")
    with pytest.warns(UserWarning, match="unsafe"):
        assert make_env("opd_agents/PythonMath-v0", sandbox="unsafe").unwrapped.sandbox == "unsafe"
    with pytest.raises(ConfigError, match="sandbox must be one of"):
        make_env("opd_agents/PythonMath-v0", sandbox="off")
