"""The command line: the demo's ranking follows the known relatedness; score/info work; errors exit 2."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np

from helpers import f32_delta
from segtransfer._cli import main


def test_demo_ranking_matches_known_relatedness(capsys):
    assert main(["demo", "--json"]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert doc["ranking_matches_known_relatedness"] is True
    ranks = [s["relatedness"] for s in doc["sources"]]
    assert ranks == sorted(ranks)
    scores = [s["score"] for s in doc["sources"]]
    assert scores == sorted(scores, reverse=True)
    assert all(s["all_converged"] for s in doc["sources"])


def test_demo_tied_scores_do_not_confirm_the_ranking(capsys):
    """n_pixels=1 scores every source 0 (one pixel pair, no conditional entropy): a tie, which must not
    pass for the known ranking because the sources happen to be listed in that order."""
    assert main(["demo", "--json", "--n-pixels", "1", "--repeats", "1"]) == 1
    doc = json.loads(capsys.readouterr().out)
    assert doc["tied_scores"] is True and doc["ranking_matches_known_relatedness"] is False
    assert main(["demo", "--n-pixels", "1", "--repeats", "1"]) == 1
    assert "tied scores rank nothing" in capsys.readouterr().out


def test_score_json_and_missing_key(tmp_path, capsys):
    rng = np.random.default_rng(0)
    x = rng.normal(size=(300, 4)).astype(np.float32)
    y = rng.integers(0, 3, 300)
    np.savez(tmp_path / "s.npz", features=x, labels=y)
    np.savez(tmp_path / "t.npz", features=x + 0.5, labels=y)
    np.savez(tmp_path / "bad.npz", feats=x)
    assert main(["score", str(tmp_path / "s.npz"), str(tmp_path / "t.npz"), "--n-pixels", "200",
                 "--repeats", "2", "--json"]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert len(doc["scores"]) == 2 and np.isfinite(doc["score"])
    assert not doc["blocked"]
    # --blocked: the same draws, solved without storing the cost. Both float32 at tol 1e-6, so the scores
    # agree within test_otce's bound for two converged float32 solves, 2 (2 delta (2 + log Ct) + tol).
    assert main(["score", str(tmp_path / "s.npz"), str(tmp_path / "t.npz"), "--n-pixels", "200",
                 "--repeats", "2", "--json", "--blocked"]) == 0
    blocked = json.loads(capsys.readouterr().out)
    assert blocked["blocked"] and blocked["all_converged"]
    delta = f32_delta(x, x + 0.5, 0.1)
    np.testing.assert_allclose(blocked["scores"], doc["scores"], rtol=0, atol=2 * (2 * delta * (2 + np.log(3)) + 1e-6))
    assert main(["score", str(tmp_path / "bad.npz"), str(tmp_path / "t.npz")]) == 2
    assert "features" in capsys.readouterr().err
    assert main(["score", str(tmp_path / "nope.npz"), str(tmp_path / "t.npz")]) == 2
    assert "timed_out" in doc and doc["timed_out"] == [False, False]


def test_score_messages_speak_cli(tmp_path, capsys):
    """Advice in the command line's spelling; a text file named .npz is called what it is; a max_iter
    stop says what it means and how to go on."""
    rng = np.random.default_rng(0)
    x = rng.normal(size=(300, 4)).astype(np.float32)
    y = rng.integers(0, 3, 300)
    np.savez(tmp_path / "s.npz", features=x, labels=y)
    (tmp_path / "text.npz").write_text("not numpy\n")
    s, t = str(tmp_path / "s.npz"), str(tmp_path / "text.npz")
    assert main(["score", s, s]) == 2  # 300 pixels, n_pixels 10000 by default
    assert "pass --n-pixels all to use them all" in capsys.readouterr().err
    assert main(["score", s, t]) == 2
    assert "is not a NumPy .npz archive" in capsys.readouterr().err
    assert main(["score", s, s, "--n-pixels", "all", "--max-iter", "1"]) == 0
    err = capsys.readouterr().err
    assert "meaningless: raise --max-iter or loosen --tol" in err, err
    assert main(["score", s, s, "--n-pixels", "all", "--ignore-index=-1,255"]) == 0


def test_info(capsys):
    assert main(["info"]) == 0
    assert "CUDA built" in capsys.readouterr().out


def test_python_dash_m_runs_the_same_cli():
    # Where the console script is not on PATH (a venv not activated), `python -m segtransfer` is the way in.
    out = subprocess.run([sys.executable, "-m", "segtransfer", "info"], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert "CUDA built" in out.stdout
    bad = subprocess.run([sys.executable, "-m", "segtransfer", "nonsense"], capture_output=True, text=True, timeout=120)
    assert bad.returncode == 2
