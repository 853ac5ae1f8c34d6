from __future__ import annotations

import numpy as np
import pytest
from numpy.testing import assert_allclose

from ensemble.io.cp2k_input import InputError, cell_from_input, cell_matrix, masses_from_input, parse_input, render_input

BASE = """
&GLOBAL
  PROJECT water   ! a comment
&END GLOBAL
&FORCE_EVAL
  &SUBSYS
    &CELL
      {cell}
    &END CELL
    &KIND H
      MASS 2.014
    &END KIND
    &KIND O
    &END KIND
  &END SUBSYS
&END FORCE_EVAL
"""


def test_abc_in_angstrom_and_bohr():
    assert_allclose(cell_from_input(parse_input(BASE.format(cell="ABC 10 11 12"))), np.diag([10, 11, 12]))
    bohr = cell_from_input(parse_input(BASE.format(cell="ABC [bohr] 10 10 10")))
    assert_allclose(bohr, np.eye(3) * 10 * 0.52917720859, rtol=1e-8)


def test_vectors_and_angles():
    c = cell_from_input(parse_input(BASE.format(cell="A 10 0 0\n B 1 9 0\n C 0 0 8")))
    assert_allclose(c, [[10, 0, 0], [1, 9, 0], [0, 0, 8]])
    hexa = cell_from_input(parse_input(BASE.format(cell="ABC 3 3 5\n ALPHA_BETA_GAMMA 90 90 120")))
    assert_allclose(np.linalg.norm(hexa, axis=1), [3, 3, 5])
    assert_allclose(np.degrees(np.arccos(hexa[0] @ hexa[1] / 9)), 120)
    assert_allclose(cell_matrix([2, 3, 4], [90, 90, 90]), np.diag([2, 3, 4]))


def test_masses_and_round_trip():
    root = parse_input(BASE.format(cell="ABC 10 10 10"))
    assert masses_from_input(root) == {"H": 2.014}
    again = parse_input(render_input(root))
    assert again.section("GLOBAL").keyword("PROJECT") == "water"
    assert_allclose(cell_from_input(again), np.eye(3) * 10)
    again.ensure("MOTION/MD").set("STEPS", "5")
    assert parse_input(render_input(again)).section("motion/md").keyword("steps") == "5"


@pytest.mark.parametrize("text,match", [
    ("&GLOBAL\n PROJECT x\n", "never closed"),
    ("&GLOBAL\n&END MOTION\n", "closes section &GLOBAL"),
    ("@SET N 5\n&GLOBAL\n&END GLOBAL\n", "preprocessor"),
])
def test_malformed_inputs_say_where(text, match):
    with pytest.raises(InputError, match=match):
        parse_input(text, source="x.inp")


def test_bad_cell_unit():
    with pytest.raises(InputError, match=r"unit \[furlong\]"):
        cell_from_input(parse_input(BASE.format(cell="ABC [furlong] 1 1 1")))
