"""Models: conservative forces are -grad E, the conservative design matches the force kernel,
planted conservative coefficients are recovered, JSON round trip and malformed files."""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest
from numpy.testing import assert_allclose

from ensemble.data import load_default
from ensemble.fit import Splits, accumulate_gram, conservative_design, fit_joint, n_columns, quadratic_index
from ensemble.invariants import EXPONENTIAL, GAUSSIAN, POWER, WeightSet, invariants_frame, species_index
from ensemble.model import Model, ModelError, coefficients_from_columns, load_model

WS = WeightSet((EXPONENTIAL, GAUSSIAN, POWER), (1.0, 2.0, 2.0))


def random_model(kind, weights=WS, seed=0, cutoff=None, scale=0.05):
    rng = np.random.default_rng(seed)
    p = 2 * len(weights)
    a = tuple(rng.normal(size=p) * scale for _ in range(2))
    b = []
    for _ in range(2):
        m = rng.normal(size=(p, p)) * scale * 0.1
        b.append(0.5 * (m + m.T))
    return Model(kind=kind, species=("H", "O"), masses=(1.00794, 15.9994), weights=weights, A=a, B=tuple(b),
                 cutoff_angstrom=cutoff, width_angstrom=1.5)


@pytest.fixture(scope="module")
def frame():
    ds = load_default().isel(frame=slice(0, 30), atom=slice(0, 36)).compute()
    return ds


@pytest.mark.parametrize("cutoff", [None, 6.0, 5.0])
def test_conservative_forces_are_minus_energy_gradient_and_sum_to_zero(frame, cutoff):
    # 5 Å: a pair list (3 cells per edge of the 15.64 Å box, checked as all pairs); 6 Å: the direct loop
    model = random_model("conservative", cutoff=cutoff)
    full = load_default().isel(frame=0)
    pos = full["positions"].values if cutoff == 5.0 else frame["positions"].values[0]
    box = np.diag(frame["cell"].values)
    sp = full["species"].values if cutoff == 5.0 else frame["species"].values
    f = model.forces(pos, box, sp)
    h = 1e-5
    # central differences of E carry ~|E| eps / h of round-off
    fd_noise = 50 * np.finfo(float).eps * abs(model.energy(pos, box, sp)) / h
    for k in (0, 1, 17, 35, len(sp) - 1):
        for c in range(3):
            p, m = pos.copy(), pos.copy()
            p[k, c] += h
            m[k, c] -= h
            fd = -(model.energy(p, box, sp) - model.energy(m, box, sp)) / (2 * h)
            assert_allclose(f[k, c], fd, rtol=1e-6, atol=max(1e-9, fd_noise))
    assert_allclose(f.sum(axis=0), 0.0, atol=1e-10 * np.abs(f).max())
    # the agent kind is NOT the gradient of the summed losses: its forces differ
    agent = random_model("agent", cutoff=cutoff)
    assert np.abs(agent.forces(pos, box, sp) - f).max() > 1e-3 * np.abs(f).max()


@pytest.mark.parametrize("cutoff", [-1.0, 5.0])
def test_conservative_design_matches_the_force_kernel(frame, cutoff):
    model = random_model("conservative", cutoff=None if cutoff < 0 else cutoff)
    pos = frame["positions"].values[3]
    box = np.diag(frame["cell"].values)
    codes, _ = species_index(frame["species"].values, ["H", "O"])
    kinds, params = WS.arrays()
    phi, _ = invariants_frame(pos, box, codes, 2, kinds, params, cutoff, 1.5)
    x = conservative_design(pos, box, codes, 2, kinds, params, cutoff, 1.5, phi.reshape(len(codes), -1), True)
    p = 6
    j, l = quadratic_index(p)
    coef = np.concatenate([np.concatenate([model.A[s], model.B[s][j, l]]) for s in range(2)])
    assert x.shape == (36 * 3, 2 * n_columns(p))
    assert_allclose(x @ coef, model.forces(pos, box, frame["species"].values).ravel(), rtol=1e-10, atol=1e-12)
    # the BLAS formulation used by the fit builds the same matrix as the pair-loop reference
    from ensemble.fit import conservative_design_blas

    _, grad = invariants_frame(pos, box, codes, 2, kinds, params, cutoff, 1.5)
    xb = conservative_design_blas(pos, box, codes, 2, kinds, params, cutoff, 1.5, phi.reshape(36, -1),
                                  grad.reshape(36, -1, 3))
    assert_allclose(xb, x, rtol=1e-10, atol=1e-12 * np.abs(x).max())


def test_planted_conservative_coefficients_are_recovered(frame):
    ws = WeightSet((EXPONENTIAL, GAUSSIAN), (1.0, 2.0))
    model = random_model("conservative", weights=ws, seed=3)
    box = np.diag(frame["cell"].values)
    forces = np.stack([model.forces(p, box, frame["species"].values) for p in frame["positions"].values])
    ds = frame.assign(forces=(("frame", "atom", "xyz"), forces))
    gram = accumulate_gram(ds.chunk({"frame": 10}), ws, kind="conservative", splits=Splits(0.0, 0.8, 0.2, 0.0))
    fit = fit_joint(gram, ridge=0.0)
    assert fit.condition < 1e8
    p = 4
    j, l = quadratic_index(p)
    a_h, a_o = model.A[0].copy(), model.A[1].copy()
    # the H-O pair potential is identifiable only as a sum; the fit keeps it in H's block
    a_h[2:] += a_o[:2]
    a_o[:2] = 0.0
    truth = np.concatenate([a_h, model.B[0][j, l], a_o, model.B[1][j, l]])
    assert np.abs(fit.coef - truth).max() / np.abs(truth).max() < 1e-8
    assert max(e["validation"] for e in fit.errors.values()) < 1e-7


def test_json_round_trip_and_malformed_files(tmp_path, frame):
    model = random_model("conservative", cutoff=6.0)
    path = model.save(tmp_path / "m.json")
    again = load_model(path)
    assert again.kind == "conservative" and again.cutoff_angstrom == 6.0 and again.species == ("H", "O")
    for a, b in zip(model.B, again.B):
        np.testing.assert_array_equal(a, b)
    pos, box, sp = frame["positions"].values[0], np.diag(frame["cell"].values), frame["species"].values
    np.testing.assert_array_equal(again.forces(pos, box, sp), model.forces(pos, box, sp))
    d = json.loads(path.read_text())
    assert d["coefficients"]["O"]["A"] == list(model.A[1])
    bad = dict(d, kind="magic")
    (tmp_path / "bad.json").write_text(json.dumps(bad))
    with pytest.raises(ModelError, match=r"bad.json: model kind 'magic'"):
        load_model(tmp_path / "bad.json")
    # format 1 files (dense B, no angular block) are still read, to the same model
    v1 = json.loads(path.read_text())
    v1["format"] = "ensemble.model/1"
    for i, s in enumerate(("H", "O")):
        v1["coefficients"][s] = {"A": list(model.A[i]), "B": model.B[i].tolist()}
    (tmp_path / "v1.json").write_text(json.dumps(v1))
    old = load_model(tmp_path / "v1.json")
    np.testing.assert_array_equal(old.forces(pos, box, sp), model.forces(pos, box, sp))
    v1["coefficients"]["O"]["B"] = v1["coefficients"]["O"]["B"][:-1]
    (tmp_path / "bad2.json").write_text(json.dumps(v1))
    with pytest.raises(ModelError, match=r"species O: A must have 6 entries and B be 6x6"):
        load_model(tmp_path / "bad2.json")
    bad = json.loads(path.read_text())
    bad["coefficients"]["H"]["B_nonzero_upper"].append([2, 6, 1.0])
    (tmp_path / "bad4.json").write_text(json.dumps(bad))
    with pytest.raises(ModelError, match=r"species H: B index \(2, 6\) outside 0 <= j <= l < 6"):
        load_model(tmp_path / "bad4.json")
    # strict JSON: non-finite metrics are written as null, never NaN / Infinity
    odd = dataclasses.replace(model, metrics={"relative_rmse": {"H": float("nan")}, "condition": float("inf")})
    text = odd.save(tmp_path / "odd.json").read_text()
    assert "NaN" not in text and "Infinity" not in text
    assert json.loads(text)["metrics"] == {"relative_rmse": {"H": None}, "condition": None}
    (tmp_path / "bad3.json").write_text("{not json")
    with pytest.raises(ModelError, match="not JSON"):
        load_model(tmp_path / "bad3.json")
    with pytest.raises(ValueError, match=r"species \['C'\] are not in the model's species"):
        model.forces(pos[:3], box, np.array(["C", "H", "H"]))


def test_coefficients_from_columns_inverts_the_column_layout():
    rng = np.random.default_rng(2)
    b = rng.normal(size=(5, 5))
    b = b + b.T
    a = rng.normal(size=5)
    j, l = quadratic_index(5)
    a2, b2 = coefficients_from_columns(np.concatenate([a, b[j, l]]), 5)
    assert_allclose(a2, a)
    assert_allclose(b2, b)


@pytest.mark.parametrize("kind", ["agent", "conservative"])
def test_verlet_list_forces_equal_direct_forces_while_atoms_move(kind):
    full = load_default()
    model = random_model(kind, cutoff=5.0)
    box = np.diag(full["cell"].values)
    sp = full["species"].values
    fn = model.force_fn(box, sp, skin_angstrom=0.6)
    for t in range(0, 400, 4):                      # 2 fs apart: the list is reused, then rebuilt
        pos = full["positions"].values[t]
        f, e = fn(pos)
        assert_allclose(f, model.forces(pos, box, sp), rtol=1e-11, atol=1e-13)
        assert_allclose(e, model.energy(pos, box, sp), rtol=1e-12)
    assert 1 < fn.neighbours.builds < 50


@pytest.mark.parametrize("kind", ["agent", "conservative"])
def test_paper_mode_force_function_equals_direct_forces(frame, kind):
    model = random_model(kind)
    box = np.diag(frame["cell"].values)
    sp = frame["species"].values
    fn = model.force_fn(box, sp)
    assert fn.neighbours is None
    pos = frame["positions"].values[7]
    f, e = fn(pos)
    assert_allclose(f, model.forces(pos, box, sp), rtol=1e-12, atol=1e-14)
    assert_allclose(e, model.energy(pos, box, sp), rtol=1e-12)
