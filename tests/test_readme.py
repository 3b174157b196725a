"""The README's Python examples run as written, and print what they say they print."""

from __future__ import annotations

import contextlib
import io
import re
from pathlib import Path

README = Path(__file__).resolve().parents[1] / "README.md"


def test_readme_examples_run():
    blocks = re.findall(r"```python\n(.*?)```", README.read_text(encoding="utf-8"), re.S)
    assert len(blocks) >= 2
    namespace: dict[str, object] = {}
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        for block in blocks:
            exec(compile(block, str(README), "exec"), namespace)
    printed = out.getvalue()
    # The comments in the first example quote these lines.
    assert "Dense 3×4: W (batch of 2, shared by the batch)" in printed
    assert "Kronecker 3×12: I ⊗ x_inᵀ (batch of 2, per example)" in printed
    assert "comparisons passed" in printed
    assert "Parameter '0.W' (3, 4) float64" in printed
    assert "RepeatedBlock 15×20: W (I_5 ⊗ 3×4 block)" in printed
    assert "KroneckerMatrix 15×12: I ⊗ x_pᵀ per position (rows positions-major" in printed
    assert "Tile 15×3: [I; I; …; I (5 copies)]" in printed
    assert "DiagonalPlusLowRank 50×50: diag(p) − Σ_rows p_r p_rᵀ (rank 10)" in printed
    assert "BlockKronecker 50×20: I_5 ⊗ bᵀ (2 block(s) of 25×10)" in printed
    assert namespace["attention_report"].worst < 1e-6  # type: ignore[attr-defined]
    report = namespace["report"]
    assert report.worst < 1e-6  # type: ignore[attr-defined]
    assert namespace["L_x"].to_dense().shape == (2, 3, 4)  # type: ignore[attr-defined]
    assert set(namespace["grads"].inputs) == {"x", "y"}  # type: ignore[attr-defined]
