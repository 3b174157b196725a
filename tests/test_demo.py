"""``python -m backprop demo``: output format, figures, options and errors."""

from __future__ import annotations

import os
import re
import subprocess
import sys

import pytest

import backprop.demo
import backprop.plot
from backprop.__main__ import main
from backprop.check import GradcheckError
from backprop.demo import DemoError, run
from backprop.train import History

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
    assert all(" test loss " in e and " val " not in e for e in epochs)


def test_default_demo_reaches_97_percent(tmp_path) -> None:
    """The goal of the demo, with the default settings (a few seconds)."""
    result = run(out=tmp_path, gradcheck_examples=0, progress=False)
    assert result.test_accuracy >= 0.97
    assert len(result.history) == 20


def test_short_cnn_demo_prints_the_lines_and_writes_the_figures(tmp_path, capsys) -> None:
    pytest.importorskip("matplotlib")
    out = tmp_path / "figs"
    argv = ["demo", "--model", "cnn", "--epochs", "1", "--out", str(out), "--no-progress"]
    assert main([*argv, "--gradcheck-examples", "1"]) == 0
    lines = capsys.readouterr().out.splitlines()
    text = "\n".join(lines)
    assert lines[0].startswith("backprop demo: a convolutional network")
    assert ACCURACY_LINE.fullmatch(lines[-1]), lines[-1]
    assert float(ACCURACY_LINE.fullmatch(lines[-1])[1]) > 0.8  # one epoch already learns a lot
    assert "Conv2d(1→16, kernel 3, padding 1)" in text and "Linear(512→10)" in text
    assert [line.split()[1] for line in lines if line.startswith("epoch ")] == ["1/1"]
    (check,) = [line for line in lines if line.startswith("gradcheck on 1 test examples")]
    assert float(re.search(r"worst relative error (\S+) ", check)[1]) < 1e-2
    assert re.search(r"; (\d+) entries at a kink within the step left out", check)
    names = ["training_curves.png", "input_gradients.png", "filters.png", "toeplitz.png"]
    assert sorted(p.name for p in out.iterdir()) == sorted(names)
    for name in names:
        assert (out / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert f"figures written to {out}/: {', '.join(names)}" in text


@pytest.mark.slow
def test_default_cnn_demo_reaches_98_5_percent(tmp_path) -> None:
    """The goal of the CNN demo, with the default settings (about 10 s of training here)."""
    result = run(model="cnn", out=tmp_path, gradcheck_examples=0, progress=False)
    assert result.test_accuracy >= 0.985
    assert len(result.history) == 20


def test_short_rnn_demo_prints_the_lines_and_writes_the_figures(tmp_path, capsys) -> None:
    pytest.importorskip("matplotlib")
    out = tmp_path / "figs"
    argv = ["demo", "--model", "rnn", "--epochs", "2", "--seq-len", "6", "--hidden", "8"]
    argv += ["--truncate", "4", "--gradcheck-examples", "1", "--no-progress", "--out", str(out)]
    assert main(argv) == 0
    lines = capsys.readouterr().out.splitlines()
    text = "\n".join(lines)
    assert lines[0] == "backprop demo: an Elman RNN unrolled over 6 steps learns the adding problem"
    assert "Unrolled(RNNCell(2→8, tanh), T=6, h0=zeros)" in text and "Linear(8→1)" in text
    assert "backprop through time truncated to 4 steps" in text
    assert [line.split()[1] for line in lines if line.startswith("epoch ")] == ["1/2", "2/2"]
    (check,) = [line for line in lines if line.startswith("gradcheck on 1 test examples")]
    assert float(re.search(r"worst relative error (\S+) ", check)[1]) < 1e-2
    (norms,) = [line for line in lines if line.startswith("‖∂h_T/∂h_0‖ over 64 test sequences")]
    before, after = (float(v) for v in re.findall(r"(\d\.\d\de[+-]\d+)", norms))
    assert before > 0 and after > 0
    assert re.search(r"test set: \d+ of 1000 sums within 0.04 \(mean squared error", text)
    assert ACCURACY_LINE.fullmatch(lines[-1]), lines[-1]
    names = ["training_curves.png", "gradient_norms.png"]
    assert sorted(p.name for p in out.iterdir()) == sorted(names)
    for name in names:
        assert (out / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.slow
def test_default_rnn_demo_learns_the_adding_problem(tmp_path) -> None:
    """The goal of the RNN demo with the default settings: most sums within 0.04."""
    result = run(model="rnn", out=tmp_path, gradcheck_examples=0, progress=False)
    assert result.test_accuracy >= 0.9
    assert len(result.history) == 120 and result.history.val_loss[-1] < 0.002


def test_run_refuses_settings_of_another_model(tmp_path, capsys) -> None:
    with pytest.raises(DemoError, match="seq_len: applies to the RNN only .* not to 'mlp'"):
        run(seq_len=10, out=tmp_path / "figs")
    with pytest.raises(DemoError, match="truncate: applies to the RNN only .* not to 'cnn'"):
        run(model="cnn", truncate=5, out=tmp_path / "figs")
    with pytest.raises(DemoError, match="hidden: the RNN has one state size, got 2"):
        run(model="rnn", hidden=(8, 8), out=tmp_path / "figs")
    assert capsys.readouterr().out == ""
    assert not (tmp_path / "figs").exists()
    result = cli("demo", "--seq-len", "5")
    assert result.returncode == 2 and "argument --seq-len: applies to the RNN only" in result.stderr


def test_run_refuses_hidden_for_the_cnn_and_an_unknown_model(tmp_path, capsys) -> None:
    with pytest.raises(DemoError, match="hidden: sets the MLP's hidden layers; .* 'cnn'"):
        run(model="cnn", hidden=(16,), out=tmp_path / "figs")
    with pytest.raises(
        DemoError, match="model: must be one of mlp, cnn, rnn, transformer, got 'resnet'"
    ):
        run(model="resnet", out=tmp_path / "figs")
    assert capsys.readouterr().out == ""
    assert not (tmp_path / "figs").exists()


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
        "--model {mlp,cnn,rnn,transformer}",
        "--seq-len",
        "--truncate",
        "the RNN's state size (--model rnn)",
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
        (["demo", "--seed", "-1"], "argument --seed: '-1' is not an integer >= 0"),
        (["train"], "invalid choice: 'train'"),
        (["demo", "--model", "resnet"], "argument --model: invalid choice: 'resnet'"),
        (
            ["demo", "--model", "cnn", "--hidden", "16"],
            "argument --hidden: sets the MLP's hidden layers; it does not apply to 'cnn'",
        ),
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


# ------------------------------------------------------------------ settings checked up front


def test_run_checks_the_seed_before_anything_else(tmp_path, capsys) -> None:
    for seed in (-1, 1.5, True):
        with pytest.raises(DemoError, match="seed: must be an integer >= 0"):
            run(seed=seed, out=tmp_path / "figs")
    assert capsys.readouterr().out == ""
    assert not (tmp_path / "figs").exists()


def _bad_out(tmp_path, where: str):
    if where == "a file":
        (tmp_path / "passwd").write_text("root:x:0:0\n")
        return tmp_path / "passwd", "exists and is not a folder"
    if where == "below a file":
        (tmp_path / "passwd").write_text("root:x:0:0\n")
        return tmp_path / "passwd" / "figs", "cannot make the folder"
    if where == "read-only folder":
        if os.name != "posix" or os.geteuid() == 0:
            pytest.skip("needs a user whom file permissions bind (not root)")
        folder = tmp_path / "locked"
        folder.mkdir(mode=0o500)
        return folder, "cannot write in the folder"
    if not os.path.isdir("/proc/self"):
        pytest.skip("needs Linux's /proc, where no file can be made")
    return "/proc", "cannot write in the folder /proc"


@pytest.mark.parametrize("where", ["a file", "below a file", "read-only folder", "/proc"])
def test_a_bad_out_folder_fails_in_one_line_before_training(tmp_path, capsys, where) -> None:
    pytest.importorskip("matplotlib")  # without it no figure is written and --out is unused
    out, words = _bad_out(tmp_path, where)
    assert main(["demo", "--out", str(out), "--no-progress"]) == 2
    captured = capsys.readouterr()
    assert captured.out == ""  # not a line of training was printed
    (line,) = captured.err.splitlines()
    assert line.startswith("python -m backprop demo: error: argument --out: "), line
    assert words in line and line.endswith("(see python -m backprop demo --help)")
    with pytest.raises(DemoError, match=re.escape(words)):
        run(out=out)


def test_the_out_folder_is_made_before_training(tmp_path, capsys, monkeypatch) -> None:
    pytest.importorskip("matplotlib")
    out = tmp_path / "a" / "b"
    seen = []

    def fit(*args, **kwargs):
        seen.append(out.is_dir())
        raise KeyboardInterrupt

    monkeypatch.setattr(backprop.demo, "fit", fit)
    assert main(["demo", "--out", str(out), "--no-progress"]) == 130
    assert seen == [True]


# ------------------------------------------------------------------ a failed gradcheck

FAILURE = (
    "gradcheck Sequential: parameter '0.W': explicit Jacobian vs finite differences "
    "disagree; worst entries:\n"
    "     entry    analytic     numeric\n"
    "      1234   1.0e-11     0.5e-11"
)


def test_a_failed_gradcheck_is_printed_whole_and_exits_1(tmp_path, capsys, monkeypatch) -> None:
    def gradcheck(*args, **kwargs):
        raise GradcheckError(FAILURE)

    monkeypatch.setattr(backprop.demo, "gradcheck", gradcheck)
    argv = ["demo", "--epochs", "1", "--hidden", "8", "--no-progress", "--out", str(tmp_path)]
    assert main(argv) == 1
    captured = capsys.readouterr()
    assert f"gradcheck FAILED: {FAILURE}\n" in captured.out  # the table of worst entries too
    assert ACCURACY_LINE.fullmatch(captured.out.splitlines()[-1])
    assert captured.err == "python -m backprop demo: error: the gradcheck failed (see above)\n"


def test_an_assertion_that_is_not_a_gradcheck_is_not_taken_for_one(tmp_path, monkeypatch) -> None:
    def gradcheck(*args, **kwargs):
        raise AssertionError("a bug, not a disagreement")

    monkeypatch.setattr(backprop.demo, "gradcheck", gradcheck)
    argv = ["demo", "--epochs", "1", "--hidden", "8", "--no-progress", "--out", str(tmp_path)]
    with pytest.raises(AssertionError, match="a bug"):
        main(argv)


# ------------------------------------------------------------------ the test set, named so


def test_plot_history_names_the_validation_curves_as_asked() -> None:
    pytest.importorskip("matplotlib")
    import matplotlib.pyplot as plt

    history = History(
        epoch=[1, 2],
        train_loss=[1.0, 0.5],
        train_accuracy=[0.6, 0.8],
        val_loss=[0.9, 0.6],
        val_accuracy=[0.7, 0.9],
        seconds=[0.1, 0.2],
    )
    fig = backprop.plot.plot_history(history, val_label="test")
    try:
        legends = [[t.get_text() for t in ax.get_legend().get_texts()] for ax in fig.axes]
        lines = [[line.get_label() for line in ax.get_lines()] for ax in fig.axes]
    finally:
        plt.close(fig)
    assert legends == [["train loss", "test loss"], ["train accuracy", "test accuracy"]]
    assert lines == legends
