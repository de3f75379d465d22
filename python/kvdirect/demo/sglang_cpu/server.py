"""Start and stop real SGLang 0.5.23 servers on a CPU-only machine.

A :class:`Server` is ``python -m sglang.launch_server`` in its own process
group, run by the SGLang environment's Python (``scripts/sglang-env.sh``), on
loopback (or inside a network namespace), with the flags that make it small on
CPU: ``--device cpu --attention-backend torch_native --skip-server-warmup
--sleep-on-idle --max-total-tokens N``. ``SGLANG_USE_CPU_ENGINE=1`` is set (SGLang
reads only this variable to pick its CPU code paths) and ``pythonpath`` must
provide an ``sgl_kernel`` module (the tests' import-only stand-in).

``stop()`` ends the whole process group and removes what it left in /dev/shm
(:mod:`kvdirect.shm_leftovers`: only files this server's processes made, found by
ownership while they ran, never by name), also after a SIGKILL or a crash. Used by
tests/e2e_sglang/ and ``kvdirect demo --engine sglang``.
"""
from __future__ import annotations

import os
import signal
import socket
import subprocess
import tempfile
import time
from pathlib import Path

from kvdirect.demo.sglang_cpu import client
from kvdirect.shm_leftovers import ShmLeftovers, Watcher, group_pids


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


class ServerError(RuntimeError):
    pass


class Server:
    """One SGLang server process group. ``args``: extra launch_server flags."""

    def __init__(self, python: str, model: str, *, page_size: int = 16, max_total_tokens: int = 16384,
                 kvdirect_config: dict | str | None = None, radix: str = "kvdirect", args=(),
                 env: dict | None = None, pythonpath=(), host: str = "127.0.0.1", port: int | None = None,
                 netns: str | None = None, log_dir: str | None = None, name: str = "server"):
        self.python, self.model, self.host, self.netns, self.name = python, model, host, netns, name
        self.port = port or free_port("127.0.0.1" if netns else host)
        cmd = [python, "-m", "sglang.launch_server", "--model-path", model, "--device", "cpu",
               "--attention-backend", "torch_native", "--page-size", str(page_size),
               "--max-total-tokens", str(max_total_tokens), "--host", host, "--port", str(self.port),
               "--skip-server-warmup", "--sleep-on-idle", "--log-level", "warning"]
        if radix == "kvdirect":
            cmd += ["--radix-cache-backend", "kvdirect"]
        elif radix == "none":
            cmd += ["--disable-radix-cache"]
        elif radix != "sglang":
            raise ValueError(f"radix must be kvdirect, sglang or none, got {radix!r}")
        cmd += [str(a) for a in args]
        if netns:
            cmd = ["ip", "netns", "exec", netns] + cmd
        self.cmd = cmd
        e = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "KVDIRECT_CONFIG")}
        e["SGLANG_USE_CPU_ENGINE"] = "1"
        e["PYTHONPATH"] = os.pathsep.join(str(p) for p in pythonpath)
        e.setdefault("OMP_NUM_THREADS", str(os.cpu_count() or 1))
        if kvdirect_config is not None:
            import json

            e["KVDIRECT_CONFIG"] = kvdirect_config if isinstance(kvdirect_config, str) else json.dumps(kvdirect_config)
        e.update(env or {})
        self.env = e
        self.log_path = Path(tempfile.mkstemp(prefix=f"sglang-{name}-", suffix=".log", dir=log_dir)[1])
        self.proc: subprocess.Popen | None = None
        self.leftovers: ShmLeftovers | None = None
        self._watch: Watcher | None = None

    @property
    def url(self) -> str:
        return f"http://{self.host if not self.netns else '127.0.0.1'}:{self.port}"

    # ---- life cycle ------------------------------------------------------------
    def launch(self) -> "Server":
        """Start the process group without waiting for it to be ready (``wait_ready``)."""
        self._log = open(self.log_path, "wb")
        self.leftovers = ShmLeftovers()  # before the first process: what exists now is not this server's
        self.proc = subprocess.Popen(self.cmd, stdout=self._log, stderr=subprocess.STDOUT, env=self.env,
                                     start_new_session=True, stdin=subprocess.DEVNULL)
        self._watch = Watcher(self.leftovers, self._pids)
        return self

    def start(self, timeout: float | None = None) -> "Server":
        return self.launch().wait_ready(timeout)

    def wait_ready(self, timeout: float | None = None) -> "Server":
        # start-up is 12-20 s on an idle 2-core machine, minutes on a busy one
        timeout = timeout or float(os.environ.get("KVDIRECT_SGLANG_START_TIMEOUT", "600"))
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise ServerError(f"SGLang server {self.name} exited with {self.proc.returncode} during "
                                  f"start-up:\n{self.log_tail()}")
            if self.netns is None:
                try:
                    status, _ = client.get(self.url, "/health", timeout=5)
                    if status == 200:
                        return self
                except OSError:
                    pass
            elif self._netns_health():
                return self
            time.sleep(0.5)
        raise ServerError(f"SGLang server {self.name} not ready within {timeout:.0f}s:\n{self.log_tail()}")

    def _netns_health(self) -> bool:
        code = (f"import urllib.request,sys\ntry:\n urllib.request.urlopen('{self.url}/health',timeout=5)\n"
                "except Exception: sys.exit(1)")
        return subprocess.run(["ip", "netns", "exec", self.netns, self.python, "-c", code],
                              capture_output=True, timeout=30).returncode == 0

    def wait_exit(self, timeout: float = 120) -> int:
        """For servers expected to refuse start-up: the exit code."""
        try:
            return self.proc.wait(timeout)
        finally:
            self.stop()

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def _pids(self) -> list[int]:
        return [] if self.proc is None else group_pids(self.proc.pid)

    def _note_shm(self) -> None:
        if self.leftovers is not None:
            self.leftovers.note(self._pids())

    def kill(self, sig=signal.SIGKILL) -> None:
        """Kill the server abruptly (a host going away); ``stop`` still cleans up."""
        self._note_shm()
        if self.alive():
            os.killpg(self.proc.pid, sig)

    def stop(self, timeout: float = 8) -> list[str]:
        """End the process group; returns the /dev/shm files it left that were removed."""
        if self.proc is None:
            return []
        if self._watch is not None:
            self._watch.stop()
            self._watch = None
        self._note_shm()
        try:
            os.killpg(self.proc.pid, signal.SIGTERM)
        except ProcessLookupError:
            pass
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline and (self.proc.poll() is None or self._pids()):
            time.sleep(0.2)
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        self.proc.wait()
        removed = self.leftovers.remove() if self.leftovers is not None else []
        if not self._log.closed:
            self._log.close()
        return removed

    def log_tail(self, n: int = 60) -> str:
        try:
            lines = self.log_path.read_text(errors="replace").splitlines()
        except OSError:
            return ""
        return "\n".join(lines[-n:])

    def log_text(self) -> str:
        return self.log_path.read_text(errors="replace")

    # ---- requests --------------------------------------------------------------
    def generate(self, input_ids, max_new_tokens: int = 4, timeout: float = 300, *, logprobs: bool = False) -> dict:
        if self.netns:
            return self.generate_many([input_ids], max_new_tokens, timeout, logprobs=logprobs)[0]
        return client.generate(self.url, input_ids, max_new_tokens, timeout, logprobs=logprobs)

    def generate_many(self, prompts, max_new_tokens: int = 4, timeout: float = 600, *,
                      logprobs: bool = False) -> list[dict]:
        """Sequential requests; inside a network namespace through one client process there."""
        if not self.netns:
            return [self.generate(p, max_new_tokens, timeout, logprobs=logprobs) for p in prompts]
        import json

        job = json.dumps({"url": self.url, "max_new_tokens": max_new_tokens, "logprobs": logprobs,
                          "requests": [[int(t) for t in p] for p in prompts]})
        r = subprocess.run(["ip", "netns", "exec", self.netns, self.python, "-m", "kvdirect.demo.sglang_cpu.client"],
                           input=job, capture_output=True, text=True, timeout=timeout, cwd="/")
        if r.returncode:
            raise ServerError(f"client in netns {self.netns} failed: {r.stderr[-2000:]}")
        out = json.loads(r.stdout)
        for o in out:
            if "error" in o:
                raise ServerError(f"request to {self.name} failed: {o['error']}")
        return out

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc):
        self.stop()
