"""The stand-alone scripts under benchmarks/ that the README quotes figures from."""

import importlib.util
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _script(name):
    spec = importlib.util.spec_from_file_location(name, ROOT / "benchmarks" / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.mark.parametrize("split", ["molecules", "distance"])
def test_respa_midpoint_is_a_second_order_integrator(split):
    """Kick, midpoint step of the fast part, kick: over the same 30 fs the full model's energy
    error (K + V, ~15 eV of kinetic energy in 384 atoms) is at most 0.03 eV at 1 fs and shrinks
    like h^2 (a quarter, allowing for the fluctuation) at 0.5 fs; the counts add up (one full
    evaluation per step plus the initial one; the fast part once per fixed-point iteration, once
    after each step, once at the start)."""
    script = _script("respa_midpoint")
    model = str(ROOT / "tests/data/models/conservative-c5.json")
    err = {}
    for dt, steps in ((1.0, 30), (0.5, 60)):
        out = script.main(["--dt-fs", str(dt), "--steps", str(steps), "--split", split, "--model", model])
        assert out["failed"] is None
        assert out["ran_fs"] == pytest.approx(30.0)
        assert out["full_evaluations"] == steps + 1
        assert 2 * steps + 1 <= out["fast_evaluations"] <= steps * 31 + 1
        assert 250 < out["t_h"] < 350 and 250 < out["t_o"] < 350
        err[dt] = out["max_energy_error_ev"]
    assert err[1.0] < 0.03
    assert err[0.5] < err[1.0] / 2.5
