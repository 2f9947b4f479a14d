"""Bootstrap of the python tool's sandbox child: limits, then an audit hook, then the user's code.

Started by `tools.python_exec` (inside bubblewrap, or bare in unsafe mode) as ``python -I -S -B -X utf8
sandbox_boot.py <workdir> <memory_mb> <cpu_s> <processes> <open_files> <file_mb> hook|no-hook`` with the
working directory as cwd and the code on stdin; the code is saved as ``main.py`` so tracebacks show its
lines. Stdlib only. The OS sandbox is the boundary; the hook is a second layer that turns most attempts
into a clear message for the model. It is written so user code cannot subvert it: every builtin it uses
is bound as a default argument (user code may monkeypatch ``builtins``/``os``), everything it holds is
immutable (its frames are reachable through tracebacks), no user code runs inside it, and tracing, gc
introspection and swapping its helpers' code/defaults are refused.
"""

from __future__ import annotations

import _posixsubprocess
import os
import resource
import sys
import traceback
import types
from collections.abc import Callable

_MiB = 1024 * 1024

# Refused whatever their arguments: processes, signals, links, limits, introspection that could reach
# the hook (tracing sees its frames, gc finds it), subinterpreters (they would not inherit the hook).
_DENY_EVENTS = frozenset({
    "os.system", "os.exec", "os.posix_spawn", "os.spawn", "os.fork", "os.forkpty", "subprocess.Popen",
    "os.kill", "os.killpg", "signal.pthread_kill", "os.symlink", "os.link",
    "resource.setrlimit", "resource.prlimit", "sys.settrace", "sys.setprofile",
    "sys.monitoring.register_callback", "gc.get_objects", "gc.get_referrers", "gc.get_referents",
    "cpython.PyInterpreterState_New", "sqlite3.enable_load_extension", "sqlite3.load_extension",
})
_DENY_PREFIXES = ("socket.", "ctypes.", "syslog.")
# Modules that reach native code or processes without an audit event of their own.
_DENY_IMPORTS = frozenset({
    "ctypes", "_ctypes", "_posixsubprocess", "_xxsubinterpreters", "_xxinterpchannels", "_interpreters",
    "_testcapi", "_testinternalcapi", "_testmultiphase", "_testsinglephase", "_testbuffer", "_dbm", "_gdbm",
})
_FUNC_ATTRS = frozenset({"__code__", "__defaults__", "__kwdefaults__"})
# event -> (indices of path arguments, indices of dir_fd arguments); the path must stay in the workdir.
# Read-only proxy: the hook's defaults are visible through its frames (tracebacks), so nothing it holds
# may be mutable.
_WRITE_EVENTS = types.MappingProxyType({
    "os.mkdir": ((0,), (2,)), "os.rmdir": ((0,), (1,)), "os.remove": ((0,), (1,)),
    "os.rename": ((0, 1), (2, 3)), "os.truncate": ((0,), ()), "os.chmod": ((0,), (2,)),
    "os.chown": ((0,), (3,)), "os.utime": ((0,), (3,)), "os.setxattr": ((0,), ()),
    "os.removexattr": ((0,), ()), "shutil.chown": ((0,), ()),
})
_READ_EVENTS = frozenset({"os.listdir", "os.scandir", "os.chdir", "os.listxattr", "os.getxattr"})
_READ_FILES = frozenset({"/dev/null", "/dev/urandom"})
_WRITE_FLAGS = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_APPEND


def _set_limits(memory_mb: int, cpu_s: int, processes: int, open_files: int, file_mb: int) -> None:
    # soft == hard, so the code cannot raise them back (and resource.setrlimit is refused by the hook).
    # RLIMIT_NPROC counts the sandbox user's processes in its own user namespace: a fork bomb stops there.
    for res, value in ((resource.RLIMIT_AS, memory_mb * _MiB), (resource.RLIMIT_CPU, cpu_s),
                       (resource.RLIMIT_FSIZE, file_mb * _MiB), (resource.RLIMIT_NOFILE, open_files),
                       (resource.RLIMIT_NPROC, processes), (resource.RLIMIT_CORE, 0)):
        resource.setrlimit(res, (value, value))


def _neuter_posixsubprocess() -> None:
    """Keep `import subprocess`/`asyncio` working while its unaudited fork_exec can never run (a fresh copy
    of the module would need an import, which the hook refuses)."""

    def fork_exec(*args: object) -> None:
        raise PermissionError("sandbox: starting processes is blocked")

    _posixsubprocess.fork_exec = fork_exec


def _make_hook(workdir: str, read_roots: tuple[str, ...]) -> Callable[[str, tuple], None]:
    # Builtins and helpers are bound as defaults (not looked up at call time) and no user code may run
    # inside the hook: type()/issubclass() on real types, never isinstance() (it consults __class__).
    def exact(path: object, _str=str, _bytes=bytes, _type=type, _issubclass=issubclass) -> str | None:
        """A str/bytes (or subclass: its overridable methods are never called) as an exact str, else None."""
        kind = _type(path)
        if kind is _str:
            return path
        if _issubclass(kind, _bytes):
            return b"".join((path,)).decode("utf-8", "surrogateescape")
        if _issubclass(kind, _str):
            return "".join((path,))
        return None

    def resolve(path: object, _exact=exact, _getcwd=os.getcwd) -> str | None:
        """Absolute, lexically normalised form of a path (None when it is not str/bytes)."""
        path = _exact(path)
        if path is None:
            return None
        if not path.startswith("/"):
            path = _getcwd() + "/" + path
        parts = []
        for seg in path.split("/"):
            if seg == "..":
                if parts:
                    parts.pop()
            elif seg and seg != ".":
                parts.append(seg)
        return "/" + "/".join(parts)

    def under(path: str | None, roots: tuple[str, ...]) -> bool:
        if path is None:  # a plain loop, not any(): builtins may be monkeypatched
            return False
        for root in roots:
            if path == root or path.startswith(root + "/"):
                return True
        return False

    def hook(event: str, args: tuple, _deny=_DENY_EVENTS, _prefixes=_DENY_PREFIXES, _imports=_DENY_IMPORTS,
             _func_attrs=_FUNC_ATTRS, _writes=_WRITE_EVENTS, _reads=_READ_EVENTS, _files=_READ_FILES,
             _flags=_WRITE_FLAGS, _exact=exact, _resolve=resolve, _under=under, _w=(workdir,),
             _r=(workdir, *read_roots), _lib=read_roots, _int=int, _type=type, _err=PermissionError,
             _protected=(exact, resolve, under)) -> None:
        if event in _deny or event.startswith(_prefixes):
            raise _err(f"sandbox: {event} is blocked")
        if event == "import":
            name = _exact(args[0]) or ""
            for part in name.split("."):  # any component: "x._ctypes" would load the same init symbol
                if part in _imports:
                    raise _err(f"sandbox: import of {name!r} is blocked")
            # Native extensions only from the Python installation (never a .so written by the code).
            if args[1] is not None and not _under(_resolve(args[1]), _lib):
                raise _err(f"sandbox: loading native module {name!r} from outside the stdlib is blocked")
        elif event == "open":
            path, mode, flags = args
            if _type(path) is _int:  # an fd this process already holds
                return
            full = _resolve(path)
            if flags & _flags:
                # os.open (mode None) may carry an unaudited dir_fd, which only applies to relative paths.
                if not _under(full, _w) or (mode is None and not _exact(path).startswith("/")):
                    raise _err(f"sandbox: writing {path!r} is blocked (only the working directory is writable)")
            elif not (_under(full, _r) or full in _files):
                raise _err(f"sandbox: reading {path!r} is blocked (outside the working directory)")
        elif event in _writes:
            path_idx, dirfd_idx = _writes[event]
            for i in dirfd_idx:
                if _type(args[i]) is _int and args[i] >= 0:
                    raise _err(f"sandbox: {event} with dir_fd is blocked")
            for i in path_idx:
                if _type(args[i]) is not _int and not _under(_resolve(args[i]), _w):
                    raise _err(f"sandbox: {event} on {args[i]!r} is blocked (outside the working directory)")
        elif event in _reads:
            path = args[0]
            if path is not None and _type(path) is not _int and not _under(_resolve(path), _r):
                raise _err(f"sandbox: {event} on {path!r} is blocked (outside the working directory)")
        elif event == "sqlite3.connect":
            db = _exact(args[0])
            if db in (":memory:", ""):
                return
            if db is None or db.startswith("file:") or not _under(_resolve(db), _w):
                raise _err(f"sandbox: sqlite3 database {args[0]!r} is blocked (outside the working directory)")
        elif event in ("object.__setattr__", "object.__delattr__") and _exact(args[1]) in _func_attrs:
            # The helpers are reachable from the hook's frame; the hook itself from nowhere (gc is refused).
            for f in _protected:
                if args[0] is f:
                    raise _err(f"sandbox: changing the sandbox's {args[1]} is blocked")

    return hook


def _report(exc: BaseException, boot_file: str) -> None:
    """Print the user's traceback without the bootstrap/hook frames."""
    te = traceback.TracebackException.from_exception(exc)
    te.stack = traceback.StackSummary.from_list([f for f in te.stack if f.filename != boot_file])
    sys.stdout.flush()  # keep printed output before the traceback
    print("".join(te.format()), end="", file=sys.stderr)


def main() -> None:
    workdir = sys.argv[1]
    memory_mb, cpu_s, processes, open_files, file_mb = (int(a) for a in sys.argv[2:7])
    source = sys.stdin.buffer.read().decode("utf-8", "surrogateescape")
    with open(os.path.join(workdir, "main.py"), "w", encoding="utf-8", errors="surrogateescape") as f:
        f.write(source)
    _set_limits(memory_mb, cpu_s, processes, open_files, file_mb)
    boot_file = __file__
    if sys.argv[7] == "hook":
        _neuter_posixsubprocess()
        read_roots = tuple(os.path.normpath(os.path.abspath(p)) for p in sys.path if p)
        sys.addaudithook(_make_hook(os.path.normpath(workdir), read_roots))
    # The user's code is __main__ (pickle and `if __name__ == "__main__"` behave as in a script).
    module = types.ModuleType("__main__")
    module.__file__ = "main.py"
    sys.modules["__main__"] = module
    try:
        exec(compile(source, "main.py", "exec"), module.__dict__)
    except SystemExit:
        raise
    except BaseException as e:  # any failure of the user's code: report it, exit 1
        _report(e, boot_file)
        sys.exit(1)


if __name__ == "__main__":
    main()
