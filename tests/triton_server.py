"""Start and stop a real Triton server for a test: the tritonserver binary inside nvidia-pytriton, from the
environment `make test-servers` builds (.venv-triton; its numpy<2 pin clashes with ours), bound to
127.0.0.1 on free ports, its Python backend assembled in a temporary folder, stopped by its PID."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import time
from contextlib import contextmanager, suppress
from pathlib import Path

import pytest

ENV_VAR = "ENGINEWRIGHT_TRITON_ENV"


def triton_env() -> Path:
    """The server's environment, or a skip that says how to get it (`make test-servers` sets it)."""
    value = os.environ.get(ENV_VAR)
    if not value:
        pytest.skip(f"{ENV_VAR} is not set: `make test-servers` builds .venv-triton (nvidia-pytriton) and sets it")
    env = Path(value)
    if not (env / "bin" / "python").is_file():
        pytest.fail(f"{ENV_VAR}={env} is not a virtual environment (no bin/python); run `make test-servers`")
    return env


def _server_root(env: Path) -> Path:
    found = sorted(env.glob("lib/python3*/site-packages/pytriton/tritonserver"))
    if not found:
        pytest.fail(f"{env} has no nvidia-pytriton (pytriton/tritonserver); run `make test-servers`")
    return found[0]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _backends(root: Path, folder: Path) -> Path:
    """Triton's backend folder: the Python backend's library and utils with the stub for this Python version
    beside them (the wheel ships the stubs apart)."""
    python = folder / "python"
    python.mkdir(parents=True)
    for item in (root / "backends" / "python").iterdir():
        if item.is_file():
            (python / item.name).symlink_to(item)
    version = root.parents[2].name.removeprefix("python")  # the server environment's Python: lib/python3.X
    stub = root / "python_backend_stubs" / version / "triton_python_backend_stub"
    if not stub.is_file():
        pytest.fail(f"nvidia-pytriton has no Python backend stub for Python {version}")
    (python / stub.name).symlink_to(stub)
    return folder


@contextmanager
def triton_server(repository: Path, scratch: Path, timeout_s: float = 120.0):
    """Yield the gRPC URL of a Triton server serving `repository`; the server is stopped on exit."""
    import tritonclient.grpc as grpcclient

    env = triton_env()
    root = _server_root(env)
    http, grpc = _free_port(), _free_port()
    log = scratch / "tritonserver.log"
    command = [str(root / "bin" / "tritonserver"), f"--model-repository={repository}",
               f"--backend-directory={_backends(root, scratch / 'backends')}",
               "--http-address=127.0.0.1", f"--http-port={http}", "--grpc-address=127.0.0.1",
               f"--grpc-port={grpc}", "--allow-metrics=false", "--exit-timeout-secs=10"]
    # the Python backend's stub runs model.py with the server environment's packages (onnxruntime, numpy<2)
    child_env = {**os.environ, "PATH": f"{env / 'bin'}{os.pathsep}{os.environ.get('PATH', '')}"}
    child_env.pop("PYTHONPATH", None)
    with log.open("wb") as out:
        server = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT, env=child_env,
                                  start_new_session=True)
    url = f"127.0.0.1:{grpc}"
    try:
        client = grpcclient.InferenceServerClient(url)
        deadline = time.monotonic() + timeout_s
        while True:
            if server.poll() is not None:
                pytest.fail(f"tritonserver exited with code {server.returncode}:\n{log.read_text()[-4000:]}")
            try:
                if client.is_server_ready():
                    break
            except Exception:  # not listening yet
                pass
            if time.monotonic() > deadline:
                pytest.fail(f"tritonserver not ready after {timeout_s:.0f} s:\n{log.read_text()[-4000:]}")
            time.sleep(0.5)
        client.close()
        yield url
    finally:
        if server.poll() is None:
            os.kill(server.pid, signal.SIGTERM)
            try:
                server.wait(timeout=30)
            except subprocess.TimeoutExpired:
                server.kill()
                server.wait()
        with suppress(ProcessLookupError):  # the Python backend's stub processes, in the server's session
            os.killpg(server.pid, signal.SIGKILL)
