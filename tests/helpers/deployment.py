"""A real deployed federation on 127.0.0.1 for tests: certificates, client data files, processes.

Every process is a real `fedtune server` / `fedtune client` command; every wait is bounded, and
``close`` ends whatever is still running.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import yaml

from fedtune.config import load_config
from fedtune.data.formats import write_jsonl
from fedtune.data.prepare import prepare_federated_data
from fedtune.deploy.certs import write_certs
from fedtune.deploy.processes import free_port

BASE = {
    "model": {"name": "tiny-llama"},
    "data": {"builtin": {"train_per_task": 24, "eval_per_task": 3}, "max_seq_len": 96},
    "partition": {"method": "by_field", "field": "task", "num_clients": 3},
    "federation": {"rounds": 2},
    "training": {"local_steps": 2, "batch_size": 4, "lr": 5e-3},
    "evaluation": {"max_new_tokens": 4},
    "output": {"progress": False, "name": "fed"},
}


REPO = Path(__file__).resolve().parents[2]  # on every process's path: plug-ins defined in tests import there too


def _merge(a: dict, b: dict) -> dict:
    """``a`` with ``b``'s values set over it, section by section; a None value removes its key."""
    out = dict(a)
    for k, v in b.items():
        if v is None:
            out.pop(k, None)
            continue
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


class Federation:
    def __init__(
        self,
        root: Path,
        settings: dict | None = None,
        enrolled: int | None = None,
        host: str = "127.0.0.1",
        listen: str | None = None,
    ):
        """host: where clients reach the coordinator (its certificate covers it); listen: its listen host."""
        self.root = root
        spec = _merge(BASE, settings or {})
        n = spec["partition"]["num_clients"]
        self.port = free_port(listen or host)
        flower = {"address": f"{host}:{self.port}", "certs": str(root / "certs")}
        if listen is not None:
            flower["listen"] = f"{listen}:{self.port}"
        spec = _merge(spec, {"output": {"dir": str(root / "runs")}, "runtime": {"flower": flower}})
        self.config = root / "fed.yaml"
        self.config.write_text(yaml.safe_dump(spec))
        hosts = list(dict.fromkeys([host, "127.0.0.1", "localhost"]))
        write_certs(root / "certs", hosts, [f"client-{i}" for i in range(enrolled or n)])
        cfg = load_config(self.config)
        data = prepare_federated_data(cfg.data, cfg.partition, cfg.seed)
        for cid, part in enumerate(data.parts):
            write_jsonl((data.train[i] for i in part), root / "data" / f"client-{cid}.jsonl")
        self.run_dir = root / "runs" / "fed"
        self.procs: dict[str, subprocess.Popen] = {}

    def _start(self, tag: str, *args: str) -> subprocess.Popen:
        out = (self.root / f"{tag}.out").open("ab")
        path = os.pathsep.join(p for p in (str(REPO), os.environ.get("PYTHONPATH", "")) if p)
        env = {**os.environ, "PYTHONUNBUFFERED": "1", "COLUMNS": "200", "PYTHONPATH": path}
        proc = subprocess.Popen(
            [sys.executable, "-m", "fedtune.cli", *args], stdout=out, stderr=subprocess.STDOUT, env=env, cwd=self.root
        )
        self.procs[tag] = proc
        return proc

    def server(self, *extra: str, ready: bool = True) -> subprocess.Popen:
        """Start the coordinator; with ready, wait until its keys are enrolled and the run submitted."""
        offset = len(self.output("server"))
        proc = self._start("server", "server", str(self.config), *extra)
        if ready:
            deadline = time.monotonic() + 90
            while "coordinator on" not in self.output("server")[offset:]:
                if proc.poll() is not None or time.monotonic() > deadline:
                    raise AssertionError(f"the coordinator did not start:\n{self.output('server')[-4000:]}")
                time.sleep(0.1)
        return proc

    def client(self, cid: int, key: Path | None = None, tag: str | None = None, *extra: str) -> subprocess.Popen:
        key = key or self.root / "certs" / "clients" / f"client-{cid}.key"
        data = self.root / "data" / f"client-{cid}.jsonl"
        return self._start(
            tag or f"client-{cid}", "client", str(self.config), "--data", str(data), "--key", str(key), *extra
        )

    def output(self, tag: str) -> str:
        path = self.root / f"{tag}.out"
        return path.read_text(errors="replace") if path.exists() else ""

    def wait_for(self, tag: str, pattern: str, timeout: float = 120) -> re.Match:
        """Until the process's output matches pattern; AssertionError (with the output) after timeout."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            m = re.search(pattern, self.output(tag))
            if m:
                return m
            time.sleep(0.05)
        raise AssertionError(f"{tag}: no {pattern!r} within {timeout}s; output:\n{self.output(tag)[-4000:]}")

    def wait_exit(self, tag: str, timeout: float = 180) -> int:
        try:
            return self.procs[tag].wait(timeout)
        except subprocess.TimeoutExpired:
            raise AssertionError(f"{tag} still running after {timeout}s:\n{self.output(tag)[-4000:]}") from None

    def kill(self, tag: str, sig: int = signal.SIGKILL) -> None:
        self.procs[tag].send_signal(sig)
        self.procs[tag].wait(30)

    def close(self) -> None:
        for proc in self.procs.values():
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        for proc in self.procs.values():
            try:
                proc.wait(20)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
