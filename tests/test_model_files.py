"""Malformed model files: a one-line error (exit 2) naming the file and the field, nothing written,
inputs unchanged; a content digest ties the coefficients to their kind, basis and species."""

from __future__ import annotations

import json
import pickle
import shutil
from pathlib import Path

import numpy as np
import pytest

from conftest import DATA, ingested_dft, leftovers
from ensemble.cli import main
from ensemble.model import DIGEST_SCHEME, MAX_COEFFICIENT_EV, ModelError, load_model
from test_errors import tree_hash

FIXTURE = DATA / "models" / "conservative-c5.json"


@pytest.fixture(scope="module")
def store(tmp_path_factory) -> Path:
    return ingested_dft(tmp_path_factory.mktemp("store"))


@pytest.fixture(scope="module")
def saved(tmp_path_factory) -> dict:
    """The conservative fixture model as `Model.save` writes it today (with its digest)."""
    path = load_model(FIXTURE).save(tmp_path_factory.mktemp("saved") / "m.json")
    return json.loads(path.read_text())


def edit(d: dict, how) -> dict:
    d = json.loads(json.dumps(d))
    how(d)
    return d


def A(d, s="H"):
    return d["coefficients"][s]["A"]


EDITS = [
    ("coefficients null", lambda d: d.update(coefficients=None),
     "field 'coefficients' must be an object {species: {'A': [...], ...}}, got null"),
    ("A a string", lambda d: d["coefficients"]["H"].update(A="0.1"),
     "coefficients['H']['A'] must be a list of 14 numbers (eV), got a string ('0.1')"),
    ("A too short", lambda d: A(d).pop(), "coefficients['H']['A'] must have 14 entries (one per feature), got 13"),
    ("A entry a string", lambda d: A(d).__setitem__(3, "1.5"), "coefficients['H']['A'][3] must be a number (eV), got a string"),
    ("A missing", lambda d: d["coefficients"]["O"].pop("A"), "coefficients['O']['A'] must be a list of 14 numbers (eV), got null"),
    ("B triple malformed", lambda d: d["coefficients"]["H"]["B_nonzero_upper"].__setitem__(0, [0, 1]),
     "coefficients['H']['B_nonzero_upper'][0] must be [j, l, B_jl] with integer j, l"),
    ("huge coefficient", lambda d: A(d).__setitem__(0, 1e300),
     f"coefficients['H']['A'][0] is 1e+300; coefficients must be finite with |c| <= {MAX_COEFFICIENT_EV:g} eV"),
    ("coefficient just too large", lambda d: A(d, "O").__setitem__(2, -2 * MAX_COEFFICIENT_EV), "['A'][2] is -2000000000000.0"),
    ("species null", lambda d: d.update(species=None), "field 'species' must be a non-empty list of element names"),
    ("mass a string", lambda d: d["masses_amu"].update(H="1.008"), "masses_amu['H'] must be a number, got a string"),
    ("mass missing", lambda d: d["masses_amu"].pop("O"), "field 'masses_amu' has no mass for species 'O'"),
    ("weight functions missing", lambda d: d.pop("weight_functions"), "missing field 'weight_functions'"),
    ("cutoff a string", lambda d: d.update(cutoff_angstrom="5"), "cutoff_angstrom must be a number, got a string"),
    ("width negative", lambda d: d.update(cutoff_width_angstrom=-1.0), "cutoff_width_angstrom must be a finite number > 0"),
    ("kind unknown", lambda d: d.update(kind="magic"), "model kind 'magic' (field 'kind'); expected one of"),
    ("kind edited", lambda d: d.update(kind="agent"), "the content digest does not match"),
    ("coefficient edited", lambda d: A(d).__setitem__(0, A(d)[0] * 1.001), "the model was edited after fitting"),
    ("mass edited", lambda d: d["masses_amu"].update(H=2.014), "the content digest does not match"),
    ("digest not an object", lambda d: d.update(digest="abc"), "field 'digest' must be {'sha256': hex"),
    ("not an object", lambda d: (d.clear(), d.update(format="ensemble.model/2")), "missing field 'kind'"),
]


@pytest.mark.parametrize("name, how, message", EDITS, ids=[e[0] for e in EDITS])
def test_malformed_models_are_one_line_errors_in_simulate(store, saved, tmp_path, capsys, name, how, message):
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps(edit(saved, how)))
    before = {p: tree_hash(p) for p in (bad, store)}
    out = tmp_path / "sim.zarr"
    code = main(["simulate", "--model", str(bad), "--init", f"{store}:2", "--steps", "2", "--nve", "--out", str(out)])
    err = capsys.readouterr().err
    assert code == 2 and err.startswith(f"error: {bad}: ") and message in err and err.count("\n") == 1, err
    assert not out.exists() and leftovers(tmp_path) == []
    assert before == {p: tree_hash(p) for p in (bad, store)}


@pytest.mark.parametrize("content", [b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR\x00\x00\x01\x00", pickle.dumps({"A": 1.0}),
                                     b"\xff\xfe{\x00}\x00"], ids=["png", "pickle", "utf16"])
def test_a_model_that_is_not_utf8_text_is_one_line(store, tmp_path, capsys, content):
    bad = tmp_path / "m.json"
    bad.write_bytes(content)
    out = tmp_path / "sim.zarr"
    code = main(["simulate", "--model", str(bad), "--init", f"{store}:2", "--steps", "2", "--nve", "--out", str(out)])
    err = capsys.readouterr().err
    assert code == 2 and err == f"error: {bad}: not a UTF-8 text file (a model is the JSON file `ensemble fit` writes)\n"
    assert not out.exists() and bad.read_bytes() == content
    # the action-model reader too
    from ensemble.md.action import ActionModelError, load_action

    with pytest.raises(ActionModelError, match="not a UTF-8 text file"):
        load_action(bad)


def test_non_finite_coefficients_are_refused_even_without_a_digest(saved, tmp_path):
    for value in (float("nan"), float("inf"), -float("inf")):
        d = edit(saved, lambda d: d.pop("digest"))
        A(d)[1] = value
        text = json.dumps(d)        # NaN / Infinity: not strict JSON, but what a careless tool writes
        assert "NaN" in text or "Infinity" in text
        (tmp_path / "m.json").write_text(text)
        with pytest.raises(ModelError, match=r"coefficients\['H'\]\['A'\]\[1\] is (nan|inf|-inf); coefficients must be finite"):
            load_model(tmp_path / "m.json")


def test_the_digest_round_trips_and_covers_what_determines_the_dynamics(saved, tmp_path):
    model = load_model(FIXTURE)            # checked-in fixtures predate the digest: read as they are
    assert "digest" not in json.loads(FIXTURE.read_text())
    digest = saved["digest"]
    assert digest["scheme"] == DIGEST_SCHEME and digest["sha256"] == model.content_digest()
    assert len(digest["sha256"]) == 64 and "coefficients" in digest["covers"] and "kind" in digest["covers"]
    # save -> load -> save keeps the digest and the bytes
    p1 = model.save(tmp_path / "a.json")
    again = load_model(p1)
    p2 = again.save(tmp_path / "b.json")
    assert again.content_digest() == model.content_digest()
    a, b = json.loads(p1.read_text()), json.loads(p2.read_text())
    a["provenance"].pop("ensemble_version")
    b["provenance"].pop("ensemble_version")
    assert a == b
    pos = np.random.default_rng(0).uniform(0, 12.0, (6, 3))
    sp = np.array(["O", "H", "H", "O", "H", "H"])
    np.testing.assert_array_equal(again.forces(pos, np.full(3, 12.0), sp), model.forces(pos, np.full(3, 12.0), sp))
    # metrics and provenance are not covered (notes, not dynamics); the kind, masses, cutoff, prior are
    import dataclasses

    assert dataclasses.replace(model, metrics={"x": 1}, provenance={"y": 2}).content_digest() == model.content_digest()
    from ensemble.prior import ShortRangePrior

    prior = ShortRangePrior(("H", "O"), np.array([[1.5, 0.9], [0.9, 2.3]]), 0.1)
    for change in (dict(kind="agent"), dict(masses=(1.0, 16.0)), dict(width_angstrom=0.5), dict(cutoff_angstrom=4.0),
                   dict(prior=prior), dict(A=(model.A[0] * (1 + 1e-15), model.A[1]))):
        assert dataclasses.replace(model, **change).content_digest() != model.content_digest(), change
    # an edited file without its digest is read as edited (the documented way to use a hand edit)
    d = edit(saved, lambda d: (d.update(kind="agent"), d.pop("digest")))
    (tmp_path / "edited.json").write_text(json.dumps(d))
    assert load_model(tmp_path / "edited.json").kind == "agent"
    # the checked-in fixture, copied, still runs
    shutil.copyfile(FIXTURE, tmp_path / "c5.json")
    assert load_model(tmp_path / "c5.json").content_digest() == model.content_digest()
