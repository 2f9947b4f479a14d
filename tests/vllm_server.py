"""A real vLLM OpenAI server in a subprocess, for the slow tests that need one."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

from opd_agents.teacher import wait_for_server

REPO = Path(__file__).resolve().parents[1]


def vllm_env(**extra: str) -> dict[str, str]:
    return {**os.environ, "HF_HUB_OFFLINE": "1", "VLLM_CPU_KVCACHE_SPACE": "1", "PYTHONPATH": str(REPO), **extra}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@contextlib.contextmanager
def vllm_server(model_dir: Path, log: Path, *args: str, **env: str) -> Iterator[str]:
    """``vllm serve model_dir *args`` on a free loopback port; yields its api_base (``.../v1``) once
    healthy, prints the log's tail if anything fails, and stops the server and its engine processes."""
    port = free_port()
    cmd = [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", str(model_dir), "--dtype", "float32",
           "--max-model-len", "2048", "--enforce-eager", "--host", "127.0.0.1", "--port", str(port), *args]
    with open(log, "w") as out:
        # Own session: teardown signals the server and the engine processes it spawned, nothing else.
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=vllm_env(**env), start_new_session=True)
    api_base = f"http://127.0.0.1:{port}/v1"
    try:
        waited = wait_for_server(api_base, timeout_s=240, proc_alive=lambda: proc.poll() is None)
        print(f"\n[vllm] server healthy after {waited:.1f}s")
        yield api_base
    except Exception:
        print(log.read_text()[-4000:])
        raise
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
