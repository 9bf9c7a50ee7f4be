"""Token-position arithmetic: which tokens are pooled for a nucleus, and the global tile grid."""

from __future__ import annotations

import numpy as np
import pytest

from cellsymphony.pp._morphology_runner import plan
from cellsymphony.pp._patch_geometry import tile_assignment, token_pool_weights

GRID = (16, 16)  # UNI2-h at 224 px: 16 x 16 tokens of 14 px (7 um at 0.5 um/px)


def _nonzero(w):
    rc = np.flatnonzero(w)
    return {(int(i // 16), int(i % 16)): float(w[i]) for i in rc}


def test_centred_nucleus_pools_the_central_2x2():
    w = token_pool_weights([[112.0, 112.0]], GRID, stride=14)[0]
    assert _nonzero(w) == {(7, 7): 0.25, (7, 8): 0.25, (8, 7): 0.25, (8, 8): 0.25}


def test_offsets_move_the_pooled_tokens():
    # half a token (7 px = 3.5 um) to the right: exactly on the centre of token column 8
    w = _nonzero(token_pool_weights([[119.0, 112.0]], GRID, stride=14)[0])
    assert w == {(7, 8): 0.5, (8, 8): 0.5}
    # on a token centre: that token only
    assert _nonzero(token_pool_weights([[7.0 + 14 * 3, 7.0 + 14 * 10]], GRID, stride=14)[0]) == {(10, 3): 1.0}
    # a quarter of the way between token centres (x) and on a centre row (y)
    w = _nonzero(token_pool_weights([[14 * 5 + 7 + 3.5, 14 * 2 + 7]], GRID, stride=14)[0])
    assert w == {(2, 5): 0.75, (2, 6): 0.25}
    # beyond the last token centre: clamped to the edge tokens, weights still sum to one
    w = token_pool_weights([[223.0, 1.0]], GRID, stride=14)[0]
    assert _nonzero(w) == {(0, 15): 1.0}


def test_radius_widens_the_pool():
    centre = [[112.0, 112.0]]
    small = token_pool_weights(centre, GRID, stride=14, radius_px=10.0)[0]  # centres at 9.9 px
    assert _nonzero(small) == {(7, 7): 0.25, (7, 8): 0.25, (8, 7): 0.25, (8, 8): 0.25}
    wide = token_pool_weights(centre, GRID, stride=14, radius_px=23.0)[0]  # adds the 8 next ones at 22.1 px
    assert len(_nonzero(wide)) == 12 and np.isclose(wide.sum(), 1.0)
    tiny = token_pool_weights([[119.0, 112.0]], GRID, stride=14, radius_px=1.0)[0]  # none in range: nearest one
    assert len(_nonzero(tiny)) == 1


def test_uni_v1_grid():
    # UNI (v1): 14 x 14 tokens of 16 px; the centre is again between the middle two
    w = token_pool_weights([[112.0, 112.0]], (14, 14), stride=16)[0].reshape(14, 14)
    assert np.argwhere(w > 0).tolist() == [[6, 6], [6, 7], [7, 6], [7, 7]]


def test_tile_grid_is_global_and_keeps_context():
    rng = np.random.default_rng(0)
    xy = rng.uniform(-500, 2000, (500, 2))
    ij, pos = tile_assignment(xy, size=224, mpp=0.5, stride=112)
    # the nearest tile centre is at most half a stride away: >= 56 px of context on every side
    assert (np.abs(pos - 112) <= 56 + 1e-9).all()
    centres = ij * 112 * 0.5
    np.testing.assert_allclose(centres + (pos - 112) * 0.5, xy)
    # a subset of cells gets the same tiles and positions
    ij2, pos2 = tile_assignment(xy[::7], size=224, mpp=0.5, stride=112)
    np.testing.assert_array_equal(ij2, ij[::7])
    np.testing.assert_allclose(pos2, pos[::7])


@pytest.mark.parametrize("exact", [False, True])
@pytest.mark.parametrize("mode", ["cell", "tile"])
def test_plan_covers_every_cell_once(mode, exact):
    rng = np.random.default_rng(1)
    xy = rng.uniform(0, 600, (300, 2))
    chunks = plan(xy, mode=mode, size=224, mpp=0.5, batch_size=8, chunk_size=50, tile_stride=112, exact=exact)
    rows = np.concatenate([b.rows for c in chunks for b in c.work])
    assert sorted(rows.tolist()) == list(range(300))
    for c in chunks:
        np.testing.assert_array_equal(np.concatenate([b.rows for b in c.work]), c.rows)
        for b in c.work:
            assert len(b.centres) <= 8 and b.owner.max() < len(b.centres)
            # each cell's nucleus lies where the batch geometry says
            np.testing.assert_allclose(b.centres[b.owner] + (b.pos_px - 112) * 0.5, xy[b.rows])
            if exact and mode == "cell":
                np.testing.assert_array_equal(b.pos_px, 112.0)  # the nucleus at the patch centre
            elif mode == "cell":  # a band window: the nucleus within half a pixel of its centre
                assert np.abs(b.pos_px - 112).max() <= 0.5
    if mode == "tile":
        n_tiles = sum(len(b.centres) for c in chunks for b in c.work)
        assert n_tiles <= 12 * 12  # 600 um square, 56 um stride: tile centres 0, 56, ..., 616 um
