"""bmtard_ray/runtime/fileio.py: a figure is saved whole under its real name or not at all."""
from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import pytest  # noqa: E402

from bmtard_ray.runtime.fileio import atomic_figure  # noqa: E402


def test_a_figure_is_written_in_the_format_its_name_asks_for_and_nothing_else_is_left(tmp_path: Path) -> None:
    fig, ax = plt.subplots()
    ax.plot([0, 1], [1, 0])
    path = atomic_figure(fig, tmp_path / "sub" / "curve.png", dpi=50)
    plt.close(fig)
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert [p.name for p in path.parent.iterdir()] == ["curve.png"]


def test_a_figure_that_fails_half_way_leaves_the_old_file_and_no_temporary(tmp_path: Path) -> None:
    path = tmp_path / "curve.png"
    path.write_bytes(b"old")
    fig, _ = plt.subplots()

    def half_then_fail(target: Path, **_: object) -> None:
        Path(target).write_bytes(b"\x89PNG half")
        raise OSError("disk full")

    fig.savefig = half_then_fail  # type: ignore[method-assign]
    with pytest.raises(OSError, match="disk full"):
        atomic_figure(fig, path)
    plt.close(fig)
    assert path.read_bytes() == b"old" and [p.name for p in tmp_path.iterdir()] == ["curve.png"]
