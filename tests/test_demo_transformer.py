"""``python -m backprop demo --model transformer``: the data, the model, the output
format and figures, and the accuracy it promises."""

from __future__ import annotations

import re

import numpy as np
import pytest

import backprop as bp
from backprop.__main__ import main
from backprop.demo import DEFAULTS, DemoError, run
from backprop.demo_transformer import attention_weights, build_transformer, make_digit_sequences

ACCURACY_LINE = re.compile(r"test accuracy: (\d\.\d\d)")


def test_digit_sequences_are_seeded_and_their_targets_right() -> None:
    X, y = make_digit_sequences(50, 8, rng=3)
    assert X.shape == y.shape == (50, 8) and X.dtype == y.dtype == np.int64
    assert X.min() >= 0 and X.max() <= 9 and len(np.unique(X)) == 10
    for t in range(8):
        np.testing.assert_array_equal(y[:, t], X[:, 7 - t])
    again, _ = make_digit_sequences(50, 8, rng=3)
    np.testing.assert_array_equal(X, again)
    assert not np.array_equal(X, make_digit_sequences(50, 8, rng=4)[0])
    X, y = make_digit_sequences(40, 6, task="sort", vocab=5, rng=0)
    for row, target in zip(X, y, strict=True):
        assert sorted(row.tolist()) == target.tolist()
    with pytest.raises(ValueError, match="task must be one of"):
        make_digit_sequences(4, task="shuffle")
    with pytest.raises(ValueError, match="length must be a positive integer, got 0"):
        make_digit_sequences(4, 0)


def test_the_model_is_a_graph_with_the_loss_over_positions() -> None:
    model = build_transformer(vocab=5, length=4, d=8, n_heads=2, dim_feedforward=16, n_blocks=2)
    names = [info.name for info in model.nodes() if not info.auto]
    assert names == [
        "ids", "labels", "embed", "position", "block1", "block2", "norm", "logits",
        "classes_first", "loss",
    ]  # fmt: skip
    X, y = make_digit_sequences(3, 4, vocab=5, rng=1)
    J = model.forward({"ids": X, "labels": y})
    logits = model["classes_first"].operating_point().x_out
    assert logits.shape == (3, 5, 4)  # classes on axis 1
    # the cost is the mean over every position of -log softmax at the label
    z = logits - logits.max(axis=1, keepdims=True)
    log_p = z - np.log(np.exp(z).sum(axis=1, keepdims=True))
    picked = np.take_along_axis(log_p, y[:, None, :], axis=1)
    np.testing.assert_allclose(J, -picked.mean(), rtol=1e-12)
    report = bp.gradcheck(model, X, y)
    assert report.checks and report.worst < 1e-6


def test_attention_weights_are_the_softmax_rows_of_each_block() -> None:
    model = build_transformer(vocab=5, length=4, d=8, n_heads=2, dim_feedforward=16, n_blocks=2)
    X, _ = make_digit_sequences(3, 4, vocab=5, rng=2)
    A = attention_weights(model, X)
    assert A.shape == (3, 2, 2, 4, 4)
    np.testing.assert_allclose(A.sum(axis=-1), 1.0, rtol=1e-12)
    # block 1's weights, by hand from its parameters: softmax(Q Kᵀ/√m) of LN(embed + P)
    mha = model["block1"]["attn"]
    P = {k: p.value for k, p in mha.params.items()}
    x = model["embed"].params["W"].value[X] + model["position"].codes[:4]
    n = (x - x.mean(-1, keepdims=True)) / np.sqrt(x.var(-1, keepdims=True) + 1e-5)
    Q = (n @ P["Wq"].T + P["bq"]).reshape(3, 4, 2, 4).transpose(0, 2, 1, 3)
    K = (n @ P["Wk"].T + P["bk"]).reshape(3, 4, 2, 4).transpose(0, 2, 1, 3)
    S = Q @ K.transpose(0, 1, 3, 2) / 2.0
    expected = np.exp(S - S.max(-1, keepdims=True))
    np.testing.assert_allclose(A[:, 0], expected / expected.sum(-1, keepdims=True), rtol=1e-10)


def test_short_transformer_demo_prints_the_lines_and_writes_the_figures(tmp_path, capsys) -> None:
    pytest.importorskip("matplotlib")
    out = tmp_path / "figs"
    argv = ["demo", "--model", "transformer", "--epochs", "2", "--out", str(out)]
    assert main([*argv, "--no-progress", "--seed", "1"]) == 0
    lines = capsys.readouterr().out.splitlines()
    text = "\n".join(lines)
    assert lines[0].startswith("backprop demo: a transformer (1 pre-norm encoder block")
    assert ACCURACY_LINE.fullmatch(lines[-1]), lines[-1]
    assert float(ACCURACY_LINE.fullmatch(lines[-1])[1]) > 0.3  # chance is 0.1
    assert "Embedding(10, 32)" in text and "Linear(32→10)" in text
    assert [line.split()[1] for line in lines if line.startswith("epoch ")] == ["1/2", "2/2"]
    assert all(" test loss " in line for line in lines if line.startswith("epoch "))
    (check,) = [line for line in lines if line.startswith("gradcheck on 1 test examples")]
    assert float(re.search(r"worst relative error (\S+) ", check)[1]) < 1e-2
    assert re.search(r"test set: \d+ of 8000 digits correct, \d+ of 1000 sequences", text)
    names = ["training_curves.png", "attention.png"]
    assert sorted(p.name for p in out.iterdir()) == sorted(names)
    for name in names:
        assert (out / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert f"figures written to {out}/: {', '.join(names)}" in text


@pytest.mark.parametrize("seed", [0, 1, 2, 3])
def test_default_transformer_demo_reverses_99_percent_of_held_out_digits(tmp_path, seed) -> None:
    """The goal of the demo, with the default settings (a few seconds of training each)."""
    result = run(model="transformer", seed=seed, out=tmp_path, gradcheck_examples=0, progress=False)
    assert result.test_accuracy >= 0.99
    assert len(result.history) == DEFAULTS["transformer"]["epochs"]
    assert result.history.val_accuracy[-1] == result.test_accuracy


def test_trained_attention_finds_the_mirrored_position() -> None:
    """Trained on reversal, query t (averaged over heads and sequences) gives key 7 − t
    the largest weight; the untrained model does not."""
    X, y = make_digit_sequences(2000, rng=0)
    X_test, _ = make_digit_sequences(50, rng=1)
    model = build_transformer(seed=0)
    mirror = np.arange(8)[::-1]
    before = attention_weights(model, X_test).mean(axis=(0, 1, 2))
    assert not np.array_equal(before.argmax(axis=-1), mirror)
    s = DEFAULTS["transformer"]
    opt = bp.Adam(model.parameters(), lr=s["lr"])
    bp.fit(
        model, X, y, epochs=s["epochs"], batch_size=s["batch_size"], optimizer=opt, progress=False
    )
    after = attention_weights(model, X_test).mean(axis=(0, 1, 2))
    np.testing.assert_array_equal(after.argmax(axis=-1), mirror)
    assert after[np.arange(8), mirror].min() > 0.4


def test_the_transformer_refuses_hidden(tmp_path) -> None:
    with pytest.raises(DemoError, match="hidden: .* does not apply to 'transformer'"):
        run(model="transformer", hidden=(16,), out=tmp_path / "figs")
    assert not (tmp_path / "figs").exists()
