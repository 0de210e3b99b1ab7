"""A real `tidegate serve` process for tests: config file, free port, HTTP helpers."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from tidegate.states import TERMINAL

# A job in one of these states stays there (interrupted ones are retried).
FINISHED = {str(s) for s in TERMINAL}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class Daemon:
    root: Path
    config: dict[str, Any]
    env: dict[str, str] = field(default_factory=dict)
    token: str | None = None
    proc: subprocess.Popen[str] | None = None
    nofile: int | None = None  # the daemon's open-file limit (RLIMIT_NOFILE), if set
    port: int = 0
    _stderr: Any = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self, wait_ready: bool = True, timeout: float = 120) -> Daemon:
        host, _, port = self.config.get("listen", "127.0.0.1:0").rpartition(":")
        self.port = int(port) or self.port or free_port()
        self.config["listen"] = f"{host}:{self.port}"
        cfg = self.root / "tidegate.yaml"
        cfg.write_text(yaml.safe_dump(self.config))
        env = dict(os.environ, PYTHONUNBUFFERED="1", **self.env)
        if self._stderr is not None:
            self._stderr.close()
        self.stderr_path = self.root / f"daemon-{time.monotonic_ns()}.log"
        self._stderr = self.stderr_path.open("w")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "tidegate", "serve", "--config", str(cfg)],
            stdout=subprocess.DEVNULL, stderr=self._stderr, text=True, env=env,
            start_new_session=True, preexec_fn=self._limits if self.nofile else None,
        )
        if wait_ready:
            self.wait_ready(timeout)
        return self

    def _limits(self) -> None:
        import resource

        assert self.nofile is not None
        resource.setrlimit(resource.RLIMIT_NOFILE, (self.nofile, self.nofile))

    def log(self) -> str:
        return self.stderr_path.read_text()

    def wait_ready(self, timeout: float = 120) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            assert self.proc is not None
            if self.proc.poll() is not None:
                raise AssertionError(f"daemon exited {self.proc.returncode}:\n{self.log()}")
            status, _ = self.request("GET", "/readyz", auth=False)
            if status == 200:
                return
            time.sleep(0.1)
        raise TimeoutError(f"daemon not ready:\n{self.log()}")

    def request(self, method: str, path: str, body: bytes | str | None = None, *,
                auth: bool = True, headers: dict[str, str] | None = None,
                ) -> tuple[int, Any]:
        data = body.encode() if isinstance(body, str) else body
        req = urllib.request.Request(self.url + path, data=data, method=method,
                                     headers=dict(headers or {}))
        if auth and self.token:
            req.add_header("Authorization", f"Bearer {self.token}")
        try:
            with urllib.request.urlopen(req, timeout=10) as r:
                raw = r.read()
                status = r.status
        except urllib.error.HTTPError as err:
            raw, status = err.read(), err.code
        except OSError:
            return 0, None
        try:
            return status, json.loads(raw)
        except ValueError:
            return status, raw.decode(errors="replace")

    def wait_job(self, job_id: str, states: set[str], timeout: float = 300) -> dict:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            status, job = self.request("GET", f"/v1/jobs/{job_id}")
            if status == 200 and job["state"] in states:
                return job
            if status == 200 and job["state"] in FINISHED and job["state"] not in states:
                # Ended in a state the test did not wait for: say so now, not at timeout.
                raise AssertionError(f"job {job_id} ended {job['state']}, not one of "
                                     f"{sorted(states)}: {job}")
            time.sleep(0.2)
        raise TimeoutError(f"job {job_id} not in {states}:\n{self.log()}")

    def signal(self, signum: int) -> None:
        assert self.proc is not None
        os.kill(self.proc.pid, signum)

    def kill_all(self) -> None:
        """SIGKILL the daemon and its embedded cluster's processes."""
        if self.proc is not None and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(timeout=30)

    def wait_exit(self, timeout: float) -> int:
        assert self.proc is not None
        return self.proc.wait(timeout=timeout)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                self.kill_all()
        if self._stderr is not None:
            self._stderr.close()
            self._stderr = None


def base_config(root: Path, **extra: Any) -> dict[str, Any]:
    config: dict[str, Any] = {
        "state_dir": str(root / "state"),
        "output_root": str(root / "outputs"),
        "cluster": {"local": {"workers": 2, "threads_per_worker": 1}},
        "drain_timeout_s": 30,
        "flush": {"params": 5, "seconds": 2},
    }
    config.update(extra)
    return config
