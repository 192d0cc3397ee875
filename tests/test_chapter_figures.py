"""experiments/chapter_figures.py at tiny sizes: figures written, numbers sane."""
import pytest

from experiments import chapter_figures
from experiments.benchmarks.common import load_reference

HAVE_TORCH = load_reference() is not None


@pytest.fixture(scope="module")
def result(tmp_path_factory):
    """One run of the script at tiny sizes (with the chapter's code when available)."""
    out = tmp_path_factory.mktemp("figures")
    flags = ["--out", str(out), "--batch", "2", "--size", "8", "--channels", "8", "--inner", "16"]
    return out, chapter_figures.main(flags + (["--torch"] if HAVE_TORCH else []))


def test_figures_written(result):
    out, result = result
    assert [p.name for p in result["figures"]] == ["anderson_vs_forward.png", "forward_vs_backward.png"]
    for path in result["figures"]:
        assert path.parent == out and path.stat().st_size > 0, path


def test_anderson_needs_fewer_evaluations(result):
    rows = result[1]["rows"]
    assert rows["Anderson"]["steps_mean"] < rows["Forward iteration"]["steps_mean"]
    assert all(row["converged"] == 1.0 for row in rows.values())


def test_explicit_backward_is_fixed_point_gradient(result):
    result = result[1]
    # The script's explicitly repeated backward solve is the one inside dj.fixed_point.
    assert result["grad_rel_diff"] < 1e-5
    assert float(result["probe_stats"].mean_steps) == result["rows"]["DEQ backward"]["steps_mean"]


@pytest.mark.skipif(not HAVE_TORCH, reason="the chapter's PyTorch reference or torch is not available")
def test_torch_side_by_side(result):
    result = result[1]
    assert set(result["torch"]) == set(result["rows"])
    # Same weights and inputs: both DEQ layers reach the same fixed point and gradient
    # up to the solver tolerance (1e-4), which checks the weight conversion.
    assert result["torch_rel_diff"]["z_star"] < 1e-3
    assert result["torch_rel_diff"]["dL/dx"] < 1e-2
