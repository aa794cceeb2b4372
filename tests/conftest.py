"""Shared fixtures: the real CIFAR-10 copy (built once per session from ../shared) and tiny run configs."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared"


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Tests marked ``gpu`` are skipped where no CUDA GPU is visible, unless BMTARD_GPU_TESTS_ON_CPU=1 asks
    for their CPU stand-in run (the device check's dry run)."""
    gpu_items = [item for item in items if item.get_closest_marker("gpu") is not None]
    if not gpu_items or os.environ.get("BMTARD_GPU_TESTS_ON_CPU") == "1":
        return
    import torch

    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU (bench/device_check.py runs it on one)")
    for item in gpu_items:
        item.add_marker(skip)


@pytest.fixture(scope="session")
def cifar_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A folder holding cifar-10-batches-py/: the repo's data/ when built, else built now from ../shared."""
    local = REPO / "data"
    if (local / "cifar-10-batches-py" / "test_batch").is_file():
        return local
    out = tmp_path_factory.mktemp("cifar")
    script = SHARED / "data" / "build_cifar10.py"
    assert script.is_file(), f"{script} is missing: the tests need ../shared beside the repository"
    subprocess.run([sys.executable, str(script), "--out", str(out)], check=True, capture_output=True)
    return out


# Ports handed out come from below the kernel's ephemeral range (32768-60999 here) and above Ray's worker
# ports (10002-19999): a port the kernel picks for someone's bind(0) or outgoing connection (a Ray process's
# gRPC server starting meanwhile) can no longer take one between free_port() and its listener's bind, which
# is how a CI run lost a test cluster's dashboard ("address already in use").
_PORTS = range(20000, 32768)
_handed_out: set[int] = set()


def one_line(exc: pytest.ExceptionInfo[BaseException], *needles: str) -> str:
    """The error's message, which must be one line holding every needle."""
    msg = str(exc.value)
    assert "\n" not in msg, msg
    for needle in needles:
        assert needle in msg, msg
    return msg


def free_port() -> int:
    """A TCP port nothing listens on right now, never handed out before by this process."""
    import random
    import socket

    for port in random.sample(_PORTS, len(_PORTS)):
        if port in _handed_out:
            continue
        with socket.socket() as sock:
            try:
                sock.bind(("0.0.0.0", port))  # taken on any address also blocks 127.0.0.1
            except OSError:
                continue
        _handed_out.add(port)
        return port
    raise RuntimeError(f"no free TCP port in {_PORTS.start}-{_PORTS.stop - 1}")


def head_port_flags(gcs: int, dashboard: int) -> list[str]:
    """`ray start --head` flags giving every port of a test head a free one: the defaults (e.g. the dashboard
    agent's 52365) are taken when another Ray runs on the machine, such as a test module's own local Ray,
    and the head then comes up without a job agent ("No available agent to submit job")."""
    ports = {"--port": gcs, "--dashboard-port": dashboard, "--ray-client-server-port": free_port(),
             "--dashboard-agent-listen-port": free_port(), "--dashboard-agent-grpc-port": free_port(),
             "--metrics-export-port": free_port(), "--runtime-env-agent-port": free_port(),
             "--node-manager-port": free_port(), "--object-manager-port": free_port()}
    return [str(x) for kv in ports.items() for x in kv]


def read_scalars(folder: Path) -> dict[str, dict[int, float]]:
    """Every scalar in the TensorBoard event files directly in ``folder``: {tag: {step: value}}.

    Reads the TFRecord framing itself (length, CRC, record, CRC) with tensorboardX's Event message, so the
    tests need neither TensorFlow nor TensorBoard."""
    import struct

    from tensorboardX.proto.event_pb2 import Event

    out: dict[str, dict[int, float]] = {}
    for path in sorted(folder.glob("events.out.tfevents.*")):
        data = path.read_bytes()
        pos = 0
        while pos + 12 <= len(data):
            (length,) = struct.unpack("<Q", data[pos:pos + 8])
            record = data[pos + 12:pos + 12 + length]
            pos += 12 + length + 4
            event = Event()
            event.ParseFromString(record)
            for value in event.summary.value:
                out.setdefault(value.tag, {})[int(event.step)] = float(value.simple_value)
    return out
