"""``python -m backprop demo``: output format, figures, options and errors."""

from __future__ import annotations

import re
import subprocess
import sys

import pytest

from backprop.__main__ import main
from backprop.demo import run

ACCURACY_LINE = re.compile(r"test accuracy: (\d\.\d\d)")


def cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "backprop", *args], capture_output=True, text=True, timeout=120
    )


def test_short_demo_prints_the_lines_and_writes_the_figures(tmp_path, capsys) -> None:
    pytest.importorskip("matplotlib")
    out = tmp_path / "figs"
    argv = ["demo", "--epochs", "2", "--hidden", "16", "--out", str(out)]
    assert main([*argv, "--gradcheck-examples", "1", "--no-progress", "--seed", "3"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert ACCURACY_LINE.fullmatch(lines[-1]), lines[-1]
    assert float(ACCURACY_LINE.fullmatch(lines[-1])[1]) > 0.5  # two epochs already learn a lot
    epochs = [line for line in lines if line.startswith("epoch ")]
    assert [e.split()[1] for e in epochs] == ["1/2", "2/2"]
    (check,) = [line for line in lines if line.startswith("gradcheck on 1 test examples")]
    worst = float(re.search(r"worst relative error (\S+) ", check)[1])
    assert worst < 1e-2
    assert "Linear(64→16)" in "\n".join(lines)
    names = {"training_curves.png", "network.png", "input_gradients.png"}
    assert {p.name for p in out.iterdir()} == names
    for name in names:
        assert (out / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert f"figures written to {out}/" in "\n".join(lines)


def test_default_demo_reaches_97_percent(tmp_path) -> None:
    """The goal of the demo, with the default settings (a few seconds)."""
    result = run(out=tmp_path, gradcheck_examples=0, progress=False)
    assert result.test_accuracy >= 0.97
    assert len(result.history) == 20


def test_without_matplotlib_the_demo_still_trains(tmp_path, capsys, monkeypatch) -> None:
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    monkeypatch.setitem(sys.modules, "matplotlib.pyplot", None)
    result = run(hidden=(8,), epochs=1, out=tmp_path / "none", gradcheck_examples=0, progress=False)
    lines = capsys.readouterr().out.splitlines()
    assert "figures skipped: matplotlib is not installed" in "\n".join(lines)
    assert lines[-1] == f"test accuracy: {result.test_accuracy:.2f}"
    assert result.figures == [] and not (tmp_path / "none").exists()


def test_help_lists_the_options() -> None:
    top = cli("--help")
    assert top.returncode == 0 and "demo" in top.stdout
    demo = cli("demo", "--help")
    assert demo.returncode == 0
    for option in (
        "--hidden",
        "--epochs",
        "--lr",
        "--optimizer",
        "--batch-size",
        "--seed",
        "--out",
        "{sgd,momentum,adam}",
    ):
        assert option in demo.stdout


@pytest.mark.parametrize(
    "args, words",
    [
        (["demo", "--bogus"], "unrecognized arguments: --bogus"),
        (["demo", "--epochs", "0"], "'0' is not a positive integer"),
        (["demo", "--lr", "fast"], "'fast' is not a positive number"),
        (["demo", "--optimizer", "rmsprop"], "invalid choice: 'rmsprop'"),
        (["demo", "--hidden"], "expected at least one argument"),
        (["train"], "invalid choice: 'train'"),
    ],
)
def test_bad_options_give_one_line_and_status_2(args, words) -> None:
    result = cli(*args)
    assert result.returncode == 2
    assert result.stdout == ""
    lines = result.stderr.splitlines()
    assert len(lines) == 1, result.stderr
    assert words in lines[0] and "--help" in lines[0]
    assert "Traceback" not in result.stderr
