"""The python tool's sandbox: what blocks each escape attempt, and what one call costs.

    .venv/bin/python bench/sandbox_escapes.py [--calls 40]

Runs every attempt of tests/sandbox_attacks.py against a throw-away host target (a temp dir with a secret
file, a live "trainer" process, a loopback listener) in three set-ups: the OS sandbox alone (audit hook
off), the OS sandbox with the hook (the default), and ``sandbox="unsafe"`` (the previous design: unshare
namespaces + rlimits + hook). Prints the exception each attempt ended with, then the per-call start-up
latency of ``print(1)`` in the OS sandbox vs unsafe mode, interleaved call by call.
"""

from __future__ import annotations

import argparse
import asyncio
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tests.sandbox_attacks import ATTEMPTS, SECRET, Target, code_for  # noqa: E402
from tools.python_exec import CodeError, SandboxLimits, SandboxMode, os_sandbox_problem, run_code  # noqa: E402

SETUPS: dict[str, tuple[SandboxMode, bool]] = {
    "OS only": ("os", False), "OS + hook (default)": ("os", True), "unsafe (old design)": ("unsafe", True),
}


def outcome(code: str, mode: SandboxMode, hook: bool) -> str:
    try:
        out = asyncio.run(run_code(code, SandboxLimits(), sandbox=mode, audit_hook=hook))
    except (CodeError, TimeoutError) as e:
        return f"{type(e).__name__}: {e}"[:70]
    if "ESCAPED" in out or SECRET in out:
        return "ESCAPED"
    return out.removeprefix("blocked: ").splitlines()[0][:70]


def latency(mode: SandboxMode) -> float:
    start = time.perf_counter()
    asyncio.run(run_code("print(1)", SandboxLimits(), sandbox=mode))
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--calls", type=int, default=40)
    args = parser.parse_args()
    if (problem := os_sandbox_problem()) is not None:
        sys.exit(f"no OS sandbox here: {problem}")
    warnings.simplefilter("ignore")
    with tempfile.TemporaryDirectory() as outside, socket.socket() as listener:
        secret = Path(outside, "secret.txt")
        secret.write_text(SECRET)
        listener.bind(("127.0.0.1", 0))
        listener.listen()
        trainer = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"])
        target = Target(outside, str(secret), trainer.pid, listener.getsockname()[1])
        print("| attempt | " + " | ".join(SETUPS) + " |\n|---|" + "---|" * len(SETUPS))
        for name in ATTEMPTS:
            cells = [outcome(code_for(name, target), *setup) for setup in SETUPS.values()]
            secret.write_text(SECRET)  # an escape in the unsafe column must not spoil the next row
            Path("/dev/shm/opd-escape").unlink(missing_ok=True)
            print(f"| {name} | " + " | ".join(c.replace("|", "/") for c in cells) + " |")
        alive = trainer.poll() is None
        trainer.kill()
    print(f"\ntrainer stand-in alive after all attempts: {alive}")
    times: dict[SandboxMode, list[float]] = {"os": [], "unsafe": []}
    for _ in range(args.calls):  # interleaved, so drift in machine load hits both alike
        for mode in times:
            times[mode].append(latency(mode))
    for mode, values in times.items():
        q = statistics.quantiles(values, n=10)
        print(f"per-call latency, sandbox={mode}: median {statistics.median(values) * 1e3:.1f} ms, "
              f"p10 {q[0] * 1e3:.1f} ms, p90 {q[-1] * 1e3:.1f} ms ({len(values)} calls)")


if __name__ == "__main__":
    main()
