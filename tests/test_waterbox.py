from __future__ import annotations

import numpy as np
import pytest
from numpy.testing import assert_allclose

from ensemble.waterbox import HOH_ANGLE_DEG, OH_BOND_ANGSTROM, box_edge_for_density, build_water_box


def test_paper_box_is_liquid_density():
    # 128 molecules at 0.997 g/cm3 need 15.66 Å; CP2K's H2O-128 box is 15.6404 Å (1.001 g/cm3)
    assert box_edge_for_density(128) == pytest.approx(15.66, abs=0.01)
    assert box_edge_for_density(32) == pytest.approx(9.865, abs=0.01)


@pytest.mark.parametrize("n,seed", [(128, 1), (33, 5), (1, 0)])
def test_geometry_overlaps_and_reproducibility(n, seed):
    box = build_water_box(n, seed=seed, box_angstrom=None)
    assert box.positions.shape == (3 * n, 3)
    assert box.species == ("O", "H", "H") * n
    mol = box.positions.reshape(n, 3, 3)
    oh = mol[:, 1:] - mol[:, :1]
    assert_allclose(np.linalg.norm(oh, axis=-1), OH_BOND_ANGSTROM, rtol=1e-12)
    cos = np.einsum("mx,mx->m", oh[:, 0], oh[:, 1]) / OH_BOND_ANGSTROM**2
    assert_allclose(np.degrees(np.arccos(cos)), HOH_ANGLE_DEG, rtol=1e-10)
    L = box.box_angstrom
    assert ((mol[:, 0] >= 0) & (mol[:, 0] < L)).all()
    if n > 1:
        d = mol[:, None, :, None, :] - mol[None, :, None, :, :]
        d -= L * np.round(d / L)
        r = np.linalg.norm(d, axis=-1)
        r[np.arange(n), np.arange(n)] = np.inf
        assert r[:, :, 0, 0].min() >= 2.5
        assert r.min() >= 1.6
    again = build_water_box(n, seed=seed)
    np.testing.assert_array_equal(again.positions, box.positions)
    assert not np.array_equal(build_water_box(n, seed=seed + 1).positions, box.positions) or n == 0


def test_orientations_are_isotropic():
    box = build_water_box(400, seed=3, density_g_cm3=0.5)
    mol = box.positions.reshape(-1, 3, 3)
    bisector = (mol[:, 1] + mol[:, 2]) / 2 - mol[:, 0]
    u = bisector / np.linalg.norm(bisector, axis=1)[:, None]
    # the mean direction of 400 uniform unit vectors has length ~ 1/sqrt(400) = 0.05
    assert np.linalg.norm(u.mean(axis=0)) < 0.15
    assert_allclose((u**2).mean(axis=0), 1 / 3, atol=0.06)


def test_impossible_density_is_refused():
    with pytest.raises(RuntimeError, match="too high"):
        build_water_box(64, seed=0, box_angstrom=8.0, max_attempts=2000)
    with pytest.raises(ValueError, match="n_molecules"):
        build_water_box(0, seed=0)
