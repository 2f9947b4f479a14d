"""The ``python`` tool: runs model-written code in a throw-away subprocess sandbox.

Layers, outermost first:
- Linux namespaces via util-linux ``unshare`` when the host allows them (user + net + pid + ipc): no
  network at all, host processes invisible, device nodes cannot be created. Probed once; skipped if absent.
- A fresh temporary working directory, a minimal environment (no host variables) and an isolated
  interpreter start (``-I -S``: stdlib only, no site-packages, no PYTHON* variables).
- Resource limits set by the child's bootstrap before the user code runs (address space, CPU time,
  file size, open files). Not ``preexec_fn``: tools run on a background thread, and Python documents
  preexec_fn as unsafe with threads (the child can deadlock between fork and exec).
- An audit hook (tools/sandbox_boot.py) refusing processes, sockets, ctypes, signals to other processes
  and file access outside the working directory (reads of the stdlib allowed).
- A wall-clock timeout that kills the whole process group.
A failure of the code raises ``CodeError`` (-> execution_failed), the timeout raises ``TimeoutError``
(-> timeout), so the model gets the traceback tail and the trajectory gets the error type.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import math
import os
import shutil
import signal
import subprocess
import sys
import tempfile
from pathlib import Path

from opd_agents.tool import Tool

BOOT_FILE = str(Path(__file__).with_name("sandbox_boot.py").resolve())
TRUNCATED = " ... [truncated]"  # same marker as the Tool wrapper
ERROR_TAIL_CHARS = 240  # the Tool wrapper cuts error messages at 300 chars; keep the traceback's end
_NAMESPACE_OPTIONS = (
    ("--user", "--map-root-user", "--net", "--pid", "--ipc", "--fork", "--kill-child"),
    ("--net", "--pid", "--ipc", "--fork", "--kill-child"),  # root without user namespaces
)


class CodeError(RuntimeError):
    """The sandboxed code exited non-zero; the message is the tail of its output (the traceback)."""


@functools.lru_cache(maxsize=1)
def namespace_prefix() -> tuple[str, ...]:
    """The ``unshare`` command line that works on this host (probed once), or () when none does."""
    exe = shutil.which("unshare")
    if exe is None:
        return ()
    for options in _NAMESPACE_OPTIONS:
        try:
            probe = subprocess.run([exe, *options, "true"], capture_output=True, timeout=10, check=False)
        except (OSError, subprocess.TimeoutExpired):
            continue
        if probe.returncode == 0:
            return (exe, *options)
    return ()


def _kill_group(proc: asyncio.subprocess.Process) -> None:
    if proc.returncode is None:  # once reaped, the pgid could belong to someone else
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(proc.pid, signal.SIGKILL)


async def _read_capped(stream: asyncio.StreamReader, limit: int) -> tuple[bytes, bytes, int]:
    """Read to EOF keeping the first and the last ``limit`` bytes (the rest is drained, so the child never
    blocks on a full pipe): the head is the normal output, the tail holds a traceback."""
    head, tail, total = bytearray(), bytearray(), 0
    while chunk := await stream.read(65536):
        total += len(chunk)
        if len(head) < limit:
            head += chunk[: limit - len(head)]
        tail = (tail + chunk)[-limit:]
    return bytes(head), bytes(tail), total


def _error_tail(text: str, limit: int = ERROR_TAIL_CHARS) -> str:
    """The last lines of the output that fit in ``limit`` chars (where the exception is); the ``^^^``
    marker lines of tracebacks are dropped to leave room for content."""
    lines = [ln for ln in text.rstrip().splitlines() if ln.strip(" ^~")] or ["(no output)"]
    tail: list[str] = []
    for line in reversed(lines):
        if sum(len(t) + 1 for t in tail) + len(line) > limit:
            break
        tail.insert(0, line)
    if not tail:  # one very long last line: keep its end
        return "..." + lines[-1][-(limit - 3):]
    return "\n".join(tail)


async def run_code(code: str, *, timeout_s: float = 5.0, memory_mb: int = 512,
                   max_output_chars: int = 2000) -> str:
    """Run ``code`` in the sandbox; return its output, or raise CodeError / TimeoutError."""
    with tempfile.TemporaryDirectory(prefix="opd_py_", ignore_cleanup_errors=True) as tmp:
        workdir = os.path.realpath(tmp)  # the hook compares resolved paths
        Path(workdir, "main.py").write_text(code, encoding="utf-8")
        cpu_s = math.ceil(timeout_s) + 1
        cmd = [*namespace_prefix(), sys.executable, "-I", "-S", "-B", "-X", "utf8", BOOT_FILE,
               workdir, str(memory_mb), str(cpu_s)]
        # -I ignores PYTHON* variables, so UTF-8 output comes from -X utf8, not PYTHONIOENCODING.
        env = {"PATH": "/usr/bin:/bin", "HOME": workdir, "TMPDIR": workdir, "LANG": "C.UTF-8"}
        proc = await asyncio.create_subprocess_exec(
            *cmd, cwd=workdir, env=env, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT, start_new_session=True,
        )
        assert proc.stdout is not None

        async def communicate() -> tuple[bytes, bytes, int, int]:
            head, tail, total = await _read_capped(proc.stdout, 4 * max_output_chars + 64)  # utf-8: <=4 B/char
            return head, tail, total, await proc.wait()

        try:
            head, tail, total, rc = await asyncio.wait_for(communicate(), timeout_s)
        except asyncio.TimeoutError:
            raise TimeoutError(f"code did not finish within {timeout_s}s and was killed") from None
        finally:
            _kill_group(proc)  # on timeout, cancellation or error: nothing it started may outlive the call
    if rc != 0:
        note = _exit_note(rc)
        raise CodeError(_error_tail(tail.decode("utf-8", errors="replace"), ERROR_TAIL_CHARS - len(note)) + note)
    text = head.decode("utf-8", errors="replace").rstrip()  # print()'s final newline is only noise
    if not text:
        return "(no output; print() the values you need)"
    if total > len(head) or len(text) > max_output_chars:
        return text[: max_output_chars - len(TRUNCATED)] + TRUNCATED
    return text


def _exit_note(rc: int) -> str:
    """Nothing for a plain exception (exit 1); the exit code or the signal otherwise."""
    if rc > 1:
        return f"\n(exit code {rc})"
    if rc >= 0:
        return ""
    name = signal.Signals(-rc).name if -rc in signal.valid_signals() else str(-rc)
    hint = {"SIGKILL": " (memory or CPU limit)", "SIGXCPU": " (CPU time limit)"}.get(name, "")
    return f"\n(killed by {name}{hint})"


def make_python_tool(timeout_s: float = 5.0, memory_mb: int = 512, max_output_chars: int = 2000) -> Tool:
    """A ``python`` tool with these limits. The sandbox's own timeout is a little shorter than the Tool's,
    so our process-group kill comes first (the Tool wrapper's cancellation also kills, as a backstop)."""
    sandbox_timeout_s = timeout_s - min(0.5, timeout_s / 4)

    async def python(code: str) -> str:
        """Run Python 3 code (standard library only) in a sandbox and return what it prints.

        No network, no subprocesses, and only the working directory is writable.

        Args:
            code: Python source code. print() the results you need to see.
        """
        return await run_code(code, timeout_s=sandbox_timeout_s, memory_mb=memory_mb,
                              max_output_chars=max_output_chars)

    return Tool(python, name="python", timeout_s=timeout_s, max_output_chars=max_output_chars)


python = make_python_tool()
