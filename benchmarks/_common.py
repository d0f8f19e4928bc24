"""Helpers shared by the benchmark scripts: machine description, medians, tables, result files.

Nothing here imports Keras: the drivers stay backend-free and start one worker process per backend
(KERAS_BACKEND must be set before Keras is imported).
"""

from __future__ import annotations

import datetime
import json
import os
import platform
import shlex
import statistics
import subprocess
import sys
from pathlib import Path

BACKENDS = ("tensorflow", "jax", "torch")
RESULTS_DIR = Path(__file__).resolve().parent / "results"
REPO_ROOT = Path(__file__).resolve().parent.parent


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def git_state() -> dict:
    """The commit measured, and whether the package had uncommitted changes then."""

    def git(*args):
        try:
            return subprocess.run(
                ["git", *args], cwd=REPO_ROOT, capture_output=True, text=True, timeout=20, check=False
            ).stdout.strip()
        except (OSError, subprocess.SubprocessError):
            return ""

    if os.environ.get("KERAS_SNAPSHOT_COMMIT"):  # a copy without the repository's history
        return {"commit": os.environ["KERAS_SNAPSHOT_COMMIT"], "package_uncommitted_changes": False}
    return {
        "commit": git("rev-parse", "--short", "HEAD"),
        "package_uncommitted_changes": bool(git("status", "--porcelain", "--", "keras_snapshot")),
    }


def accelerators() -> list[str]:
    """The GPUs nvidia-smi sees (name, memory, driver), read without importing any backend."""
    try:
        out = subprocess.run(
            ["nvidia-smi", "--query-gpu=name,memory.total,driver_version", "--format=csv,noheader"],
            capture_output=True,
            text=True,
            timeout=30,
            check=False,
        ).stdout
    except (OSError, subprocess.SubprocessError):
        return []
    return [line.strip() for line in out.splitlines() if line.strip()]


def backend_device() -> str:
    """The device the running Keras backend computes on (called inside a worker)."""
    import keras

    backend = keras.backend.backend()
    if backend == "jax":
        import jax

        device = jax.devices()[0]
        return f"{device.platform}: {device.device_kind}"
    if backend == "torch":
        import torch
        from keras.src.backend.torch.core import get_device

        device = get_device()
        return f"{device}: {torch.cuda.get_device_name()}" if device.startswith("cuda") else device
    import tensorflow as tf

    gpus = tf.config.list_logical_devices("GPU")
    return f"gpu: {gpus[0].name}" if gpus else "cpu"


def machine() -> dict:
    """The machine and software the numbers were measured on (read without importing any backend)."""
    from importlib import metadata

    versions = {}
    for package in ("keras", "tensorflow-cpu", "tensorflow", "jax", "jaxlib", "torch", "numpy"):
        try:
            versions[package] = metadata.version(package)
        except metadata.PackageNotFoundError:
            continue
    try:
        load = os.getloadavg()
    except OSError:
        load = None
    return {
        "nproc": os.cpu_count(),
        "affinity": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None,
        "cpu": cpu_model(),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "versions": versions,
        "loadavg_at_start": None if load is None else [round(x, 2) for x in load],
        "accelerators": accelerators(),
        **git_state(),
    }


def command_line() -> str:
    """The command that produced a result, as typed from the repository root."""
    script = Path(sys.argv[0]).resolve()
    try:
        script_text = str(script.relative_to(REPO_ROOT))
    except ValueError:
        script_text = str(script)
    return shlex.join(["python", script_text, *sys.argv[1:]])


def now() -> str:
    return datetime.datetime.now(datetime.timezone.utc).astimezone().isoformat(timespec="seconds")


def median(values) -> float:
    return float(statistics.median(values))


def quartiles(values) -> tuple[float, float]:
    values = sorted(values)
    if len(values) < 2:
        return (values[0], values[0]) if values else (float("nan"), float("nan"))
    q = statistics.quantiles(values, n=4, method="inclusive")
    return float(q[0]), float(q[2])


def thread_env(threads: int) -> dict:
    """Environment variables that cap every backend's compute threads (0: leave the defaults).

    Read at import time, so they must be set before the worker process starts.
    """
    if threads <= 0:
        return {}
    n = str(threads)
    return {
        "OMP_NUM_THREADS": n,  # torch (ATen/OpenMP), MKL, oneDNN
        "MKL_NUM_THREADS": n,
        "TF_NUM_INTRAOP_THREADS": n,
        "TF_NUM_INTEROP_THREADS": n,
        "XLA_FLAGS": f"--xla_cpu_multi_thread_eigen={'true' if threads > 1 else 'false'} "
        f"intra_op_parallelism_threads={n}",
    }


def run_worker(
    script: Path, backend: str, args: list[str], threads: int = 1, timeout: float | None = None
) -> dict:
    """Runs `script --worker ...` under KERAS_BACKEND=backend; returns the JSON it writes."""
    import tempfile

    env = dict(os.environ)
    env["KERAS_BACKEND"] = backend
    env.update(thread_env(threads))
    env.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    env.setdefault("PYTHONUNBUFFERED", "1")
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO_ROOT), env.get("PYTHONPATH")]))
    with tempfile.TemporaryDirectory(prefix="ks-bench-") as tmp:
        out = Path(tmp) / "result.json"
        cmd = [sys.executable, str(script), "--worker", "--result-json", str(out), *args]
        proc = subprocess.run(
            cmd, env=env, timeout=timeout, stdout=sys.stderr, stderr=sys.stderr, check=False
        )
        if proc.returncode != 0 or not out.exists():
            raise RuntimeError(
                f"worker for backend {backend!r} failed (exit {proc.returncode}): {shlex.join(cmd)}"
            )
        return json.loads(out.read_text())


def loadavg() -> list[float] | None:
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:
        return None


def markdown_table(header: list[str], rows: list[list]) -> str:
    def cell(value) -> str:
        if isinstance(value, float):
            if value != value:  # nan
                return "n/a"
            return f"{value:.3g}" if abs(value) < 1000 else f"{value:.0f}"
        return str(value)

    lines = ["| " + " | ".join(header) + " |", "| " + " | ".join("---" for _ in header) + " |"]
    lines += ["| " + " | ".join(cell(v) for v in row) + " |" for row in rows]
    return "\n".join(lines)


def machine_markdown(info: dict) -> str:
    versions = ", ".join(f"{k} {v}" for k, v in info["versions"].items())
    return (
        f"- machine: {info['cpu']}, nproc={info['nproc']} (affinity {info['affinity']}), {info['platform']}, "
        f"Python {info['python']}\n"
        f"- load average at start: {info['loadavg_at_start']} (the machine is shared: every number is a ratio "
        "of medians of interleaved repeats run side by side in one process)\n"
        f"- accelerators: {', '.join(info.get('accelerators') or []) or 'none'}\n"
        f"- versions: {versions}\n"
        f"- code: commit {info.get('commit')}"
        + (" with uncommitted changes in keras_snapshot/" if info.get("package_uncommitted_changes") else "")
    )


def write_results(stem: str, out_dir: Path, record: dict, markdown: str) -> tuple[Path, Path]:
    out_dir.mkdir(parents=True, exist_ok=True)
    json_path = out_dir / f"{stem}.json"
    md_path = out_dir / f"{stem}.md"
    json_path.write_text(json.dumps(record, indent=2, sort_keys=False) + "\n")
    md_path.write_text(markdown.rstrip() + "\n")
    return md_path, json_path


def verdict(ok: bool | None) -> str:
    return "n/a" if ok is None else ("PASS" if ok else "FAIL")


def report_header(title: str, record: dict, quick: bool, threads: int) -> str:
    """The lines every benchmark report starts with: title, command, date, machine, load, threads."""
    title += " (--quick smoke run: not a measurement)" if quick else ""
    thread_text = f"{threads}" if threads else "backend default"
    if threads:
        thread_text += " (" + " ".join(f"{k}={v!r}" for k, v in record["thread_env"].items()) + ")"
    return (
        f"{title}\n\nCommand: `{record['command']}` ({record['seconds']:.0f} s)\n\nDate: {record['date']}\n\n"
        f"{machine_markdown(record['machine'])}\n- load average at end: {record['loadavg_at_end']}\n"
        f"- compute threads per backend process: {thread_text}\n"
        + "".join(
            f"- {backend} computed on: {res['device']}\n"
            for backend, res in record["backends"].items()
            if res.get("device")
        )
    )


def publish(markdown: str, record: dict, args, prefix: str, backends: list[str]) -> None:
    """Prints the report and, unless --out '', writes it with the record under results/."""
    print(markdown)
    if args.out:
        stem = args.name or (
            prefix
            + ("" if backends == list(BACKENDS) else "-" + "-".join(backends))
            + ("-quick" if args.quick else "")
        )
        md_path, json_path = write_results(stem, Path(args.out), record, markdown)
        print(f"wrote {md_path} and {json_path}")


def start_record(parser, args, benchmark: str, **fields) -> tuple[list[str], dict]:
    """The backends asked for (checked) and the record every benchmark starts from."""
    backends = [b for b in args.backends.split(",") if b]
    for backend in backends:
        if backend not in BACKENDS:
            parser.error(f"unknown backend {backend!r}")
    record = {
        "benchmark": benchmark,
        "command": command_line(),
        "date": now(),
        "machine": machine(),
        "mode": "quick" if args.quick else "full",
        **fields,
        "threads": args.threads,
        "thread_env": thread_env(args.threads),
        "backends": {},
    }
    return backends, record
