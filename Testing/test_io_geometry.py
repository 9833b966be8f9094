"""glance.io.geometry: canonical axial orientation by permutation/flips, and back."""

from __future__ import annotations

import itertools

import numpy as np
import pytest

from glance.io import axial_axis, to_canonical
from glance.volume import Volume

SHAPE = (4, 5, 6)  # (k, j, i): distinct sizes catch any axis mix-up
SPACING = (0.7, 0.9, 2.5)  # (si, sj, sk)
ORIGIN = (-10.0, 20.0, -300.0)


def signed_permutations() -> list[np.ndarray]:
    """All 48 direction matrices whose columns are signed LPS unit vectors."""
    out = []
    for perm in itertools.permutations(range(3)):
        for signs in itertools.product((1.0, -1.0), repeat=3):
            d = np.zeros((3, 3))
            for n in range(3):
                d[perm[n], n] = signs[n]  # index axis n points along +/- LPS axis perm[n]
            out.append(d)
    return out


def rotation(axis: int, degrees: float) -> np.ndarray:
    c, s = np.cos(np.radians(degrees)), np.sin(np.radians(degrees))
    a, b = [n for n in range(3) if n != axis]
    r = np.eye(3)
    r[a, a], r[a, b], r[b, a], r[b, b] = c, -s, s, c
    return r


def volume(direction: np.ndarray) -> Volume:
    return Volume(np.arange(np.prod(SHAPE)).reshape(SHAPE), SPACING, ORIGIN, direction)


def assert_lps_preserved(v: Volume, canonical: np.ndarray, grid) -> None:
    """Every voxel's value sits at the same LPS position in both arrays (values are unique ids)."""
    c_index = np.stack(np.meshgrid(*[np.arange(n) for n in canonical.shape], indexing="ij"), -1).reshape(-1, 3)
    c_lps = np.c_[c_index, np.ones(len(c_index))] @ grid.index_to_lps.T
    k, j, i = np.unravel_index(canonical.reshape(-1), SHAPE)
    assert np.allclose(c_lps[:, :3], v.ijk_to_lps(np.stack([i, j, k], -1)), atol=1e-9)


@pytest.mark.parametrize("direction", signed_permutations(), ids=lambda d: str(d.astype(int).tolist()))
def test_signed_permutations_round_trip_and_orientation(direction):
    v = volume(direction)
    canonical, grid = to_canonical(v)
    assert np.shares_memory(canonical, v.array)  # a view, never a copy
    back = grid.to_original(canonical)
    assert back.shape == SHAPE and np.array_equal(back, v.array)
    # canonical axes 0, 1, 2 run along +S, +P, +L with the right spacing
    m = grid.index_to_lps[:3, :3]
    s0, s1, s2 = grid.canonical_spacing
    assert np.allclose(m, [[0, 0, s2], [0, s1, 0], [s0, 0, 0]], atol=1e-12)
    assert grid.obliquity_deg == pytest.approx(0.0, abs=1e-6)
    assert_lps_preserved(v, canonical, grid)
    assert axial_axis(direction) == int(np.argmax(np.abs(direction[2])))


def test_standard_axial_is_unchanged():
    v = volume(np.eye(3))
    canonical, grid = to_canonical(v)
    assert np.array_equal(canonical, v.array)
    assert grid.axes == (0, 1, 2) and grid.flips == (False, False, False)
    assert grid.canonical_spacing == (2.5, 0.9, 0.7)


def test_coronal_acquisition_by_hand():
    # i -> patient left, j -> inferior, k -> posterior: a coronal stack
    direction = np.column_stack([(1, 0, 0), (0, 0, -1), (0, 1, 0)]).astype(float)
    v = volume(direction)
    canonical, grid = to_canonical(v)
    assert canonical.shape == (5, 4, 6) and grid.canonical_spacing == (0.9, 2.5, 0.7)
    assert grid.axes == (1, 0, 2) and grid.flips == (True, False, False)
    # canonical [0, 0, 0] is the most inferior, anterior, right voxel: j = last, k = 0, i = 0
    assert canonical[0, 0, 0] == v.array[0, 4, 0]
    assert axial_axis(direction) == 1


@pytest.mark.parametrize(
    "direction, degrees",
    [
        (rotation(2, 20.0), 20.0),  # in-plane rotation of an axial scan
        (np.diag([-1.0, 1.0, 1.0]) @ rotation(0, -15.0), 15.0),  # flipped and tilted
        (rotation(1, 30.0) @ rotation(0, 10.0) @ signed_permutations()[13], None),
    ],
)
def test_oblique_uses_nearest_axes_without_resampling(direction, degrees):
    v = volume(direction)
    canonical, grid = to_canonical(v)
    assert np.shares_memory(canonical, v.array)
    assert np.array_equal(grid.to_original(canonical), v.array)
    assert_lps_preserved(v, canonical, grid)
    m = grid.index_to_lps[:3, :3] / np.asarray(grid.canonical_spacing)
    assert m[2, 0] > 0.5 and m[1, 1] > 0.5 and m[0, 2] > 0.5  # nearest to +S, +P, +L
    if degrees is not None:
        assert grid.obliquity_deg == pytest.approx(degrees, abs=1e-9)


def test_to_original_refuses_wrong_shape():
    canonical, grid = to_canonical(volume(signed_permutations()[7]))
    with pytest.raises(ValueError, match="does not match the canonical grid"):
        grid.to_original(np.zeros(SHAPE[::-1] + (1,)))
    assert grid.to_original(np.zeros(canonical.shape, np.uint8)).shape == SHAPE
