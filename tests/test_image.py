"""Tests of jlrp.image: normalisation, channel layouts, grids, palettes, saving and heatmaps."""

import io
import sys

import jax.numpy as jnp
import numpy as np
import pytest

from jlrp.cmap import ColorMap
from jlrp.image import gridify, heatmaps, imgify, imsave, interval_norm_bounds, palette

Image = pytest.importorskip("PIL.Image")


def indices(img):
    assert img.mode == "P"
    return np.asarray(img)


# ---------------------------------------------------------------------------------------------------------------
# independent, hand-checkable behaviour
# ---------------------------------------------------------------------------------------------------------------


def test_grey_array_becomes_palette_image():
    img = imgify(np.array([[-1.0, 0.0, 0.5, 2.0]]))
    assert img.mode == "P" and img.size == (4, 1)
    np.testing.assert_array_equal(
        indices(img), [[0, 85, 127, 255]]
    )  # (x - min) / (max - min) * 255, truncated
    np.testing.assert_array_equal(np.asarray(img.getpalette(), dtype=np.uint8).reshape(-1, 3), palette("bwr"))
    np.testing.assert_array_equal(np.asarray(img.convert("RGB"))[0, [0, -1]], [[0, 0, 255], [255, 0, 0]])


def test_symmetric_maps_zero_to_the_centre_colour():
    img = imgify(np.array([[-2.0, 0.0, 1.0]]), symmetric=True)
    np.testing.assert_array_equal(indices(img), [[0, 127, 191]])
    rgb = np.asarray(imgify(np.array([[-2.0, 0.0, 2.0]]), symmetric=True, cmap="gray").convert("RGB"))
    np.testing.assert_array_equal(rgb[0, 1], [127, 127, 127])


def test_vmin_vmax_override_and_clip():
    x = np.array([[-3.0, 0.0, 1.0, 5.0]])
    np.testing.assert_array_equal(indices(imgify(x, vmin=-1, vmax=1)), [[0, 127, 255, 255]])
    np.testing.assert_array_equal(indices(imgify(x, vmin=-3)), [[0, 95, 127, 255]])  # vmax from data: 5
    # symmetric bounds are -5, 5; vmin overrides only the lower one
    np.testing.assert_array_equal(indices(imgify(x, vmin=-1, symmetric=True)), [[0, 42, 85, 255]])
    with pytest.raises(ValueError, match="vmin must not exceed vmax"):
        imgify(x, vmin=2, vmax=1)
    with pytest.raises(ValueError, match="vmin must be finite"):
        imgify(x, vmin=np.nan)


def test_level_changes_the_palette_not_the_pixels():
    x = np.linspace(0.0, 1.0, 11)[None]
    flat, steep = imgify(x), imgify(x, level=2.0)
    np.testing.assert_array_equal(indices(flat), indices(steep))
    assert steep.getpalette() == palette("bwr", level=2.0).ravel().tolist()
    assert steep.getpalette() != flat.getpalette()


def test_cmap_by_name_source_or_object_and_unknown_name():
    x = np.linspace(0.0, 1.0, 5)[None]
    by_name = imgify(x, cmap="gray").getpalette()
    assert imgify(x, cmap="000,fff").getpalette() == by_name
    assert imgify(x, cmap=ColorMap("000,fff")).getpalette() == by_name
    with pytest.raises(ValueError, match="Unknown colour map 'grey'.*bwr"):
        imgify(x, cmap="grey")
    with pytest.raises(TypeError):
        palette(3)


def test_channel_last_and_channel_first_rgb_are_the_same_image():
    rng = np.random.default_rng(0)
    hwc = rng.normal(size=(4, 5, 3))
    chw = np.moveaxis(hwc, -1, 0)
    img = imgify(hwc)
    assert img.mode == "RGB" and img.size == (5, 4)
    np.testing.assert_array_equal(np.asarray(img), np.asarray(imgify(chw)))
    np.testing.assert_array_equal(np.asarray(img), np.asarray(imgify(chw, channels_last=False)))
    expected = ((hwc - hwc.min()) / (hwc.max() - hwc.min()) * 255).astype(np.uint8)
    np.testing.assert_array_equal(np.asarray(img), expected)  # one norm over the whole image


def test_single_channel_either_side_is_greyscale():
    x = np.arange(12.0).reshape(3, 4)
    reference = indices(imgify(x))
    np.testing.assert_array_equal(indices(imgify(x[..., None])), reference)
    np.testing.assert_array_equal(indices(imgify(x[None])), reference)


def test_ambiguous_shape_prefers_trailing_channels_and_override():
    x = np.arange(27.0).reshape(3, 3, 3)
    auto = np.asarray(imgify(x))
    np.testing.assert_array_equal(auto, np.asarray(imgify(x, channels_last=True)))
    first = np.asarray(imgify(x, channels_last=False))
    np.testing.assert_array_equal(first, np.asarray(imgify(np.moveaxis(x, 0, -1))))
    assert not np.array_equal(auto, first)
    with pytest.raises(ValueError, match="channels_last=True, but the last axis"):
        imgify(np.zeros((3, 4, 5)), channels_last=True)
    with pytest.raises(ValueError, match="channels_last=False, but the first axis"):
        imgify(np.zeros((4, 5, 3)), channels_last=False)


@pytest.mark.parametrize(
    ("shape", "kwargs", "match"),
    [
        ((4,), {}, "needs 2 axes"),
        ((2, 4, 5, 3), {}, "pass grid=True"),
        ((4, 5, 6), {}, "neither the last nor the first axis has size 1 or 3"),
        ((4, 5), {"grid": True}, "A batch for a grid needs 3 axes"),
        ((2, 4, 5, 6, 3), {"grid": True}, "A batch for a grid needs 3 axes"),
        ((2, 4, 5, 6), {"grid": True}, "each sample"),
        ((5, 2, 3), {"grid": (2, 2)}, "cannot hold 5 images"),
        ((5, 2, 3), {"grid": (2, 0)}, "two positive integers"),
    ],
)
def test_bad_shapes_raise_clear_errors(shape, kwargs, match):
    with pytest.raises(ValueError, match=match):
        imgify(np.zeros(shape), **kwargs)


def test_non_finite_and_complex_values_raise():
    with pytest.raises(ValueError, match="NaN or infinite.*nan_to_num"):
        imgify(np.array([[0.0, np.nan, 1.0]]))
    with pytest.raises(ValueError, match="NaN or infinite"):
        imgify(np.array([[0.0, np.inf, 1.0]]))
    with pytest.raises(ValueError, match="complex"):
        imgify(np.ones((2, 2), dtype=complex))


def test_constant_image_gets_the_centre_colour():
    np.testing.assert_array_equal(indices(imgify(np.zeros((2, 3)), symmetric=True)), np.full((2, 3), 127))
    np.testing.assert_array_equal(indices(imgify(np.full((2, 2), 4.0))), np.full((2, 2), 127))
    np.testing.assert_array_equal(
        indices(imgify(np.array([[1.0, 2.0, 3.0]]), vmin=2, vmax=2)), [[0, 127, 255]]
    )


def test_uint8_is_used_as_it_is_other_dtypes_are_normalised():
    u8 = (np.arange(6).reshape(2, 3) * 40).astype(np.uint8)
    np.testing.assert_array_equal(indices(imgify(u8)), u8)
    np.testing.assert_array_equal(indices(imgify(u8, vmin=0, vmax=255)), u8)
    np.testing.assert_array_equal(indices(imgify(u8, vmax=100))[0], [0, 102, 204])
    np.testing.assert_array_equal(indices(imgify(u8.astype(np.int64)))[1], [153, 204, 255])
    np.testing.assert_array_equal(indices(imgify(np.array([[False, True]]))), [[0, 255]])


def test_float32_jax_and_numpy_inputs_agree():
    x = np.random.default_rng(1).normal(size=(6, 7)).astype(np.float32)
    np.testing.assert_array_equal(
        indices(imgify(jnp.asarray(x), symmetric=True)), indices(imgify(x, symmetric=True))
    )


def test_grid_of_a_batch_has_the_expected_size_and_layout():
    batch = np.stack([np.full((4, 7), float(i)) for i in range(5)])
    batch[:, 0, 0] = -1.0  # each sample spans -1 .. i, normalised on its own
    img = imgify(batch, grid=True)
    assert img.mode == "P" and img.size == (2 * 7, 3 * 4)  # 5 samples: 2 columns, 3 rows
    pixels = indices(img)
    corners = pixels[::4, ::7]  # top-left pixel of each cell: -1, its sample's minimum
    np.testing.assert_array_equal(corners, 0)
    np.testing.assert_array_equal(pixels[:8, :][pixels[:8, :] != 0], 255)  # the rest: its sample's maximum
    assert (pixels[:8] == 255).sum() == 4 * (4 * 7 - 1)
    np.testing.assert_array_equal(pixels[8:, 7:], 0)  # empty cell: the smallest pixel value
    assert imgify(batch, grid=True, gridfill=99).getpixel((10, 10)) == 99
    assert imgify(batch, grid=(1, 5)).size == (5 * 7, 4)
    assert imgify(batch, grid=(3, 3)).size == (3 * 7, 3 * 4)


def test_rgb_grid_from_nhwc_and_nchw():
    rng = np.random.default_rng(2)
    nhwc = rng.normal(size=(4, 5, 6, 3))
    img = imgify(nhwc, grid=True, symmetric=True)
    assert img.mode == "RGB" and img.size == (2 * 6, 2 * 5)
    same = imgify(np.moveaxis(nhwc, -1, 1), grid=True, symmetric=True)
    np.testing.assert_array_equal(np.asarray(img), np.asarray(same))
    bound = np.abs(nhwc[1]).max()  # sample 1 sits top right, normalised with its own bound
    expected = ((nhwc[1] + bound) / (2 * bound) * 255).astype(np.uint8)
    np.testing.assert_array_equal(np.asarray(img)[:5, 6:], expected)


@pytest.mark.parametrize(
    ("count", "rows", "cols"),
    [(1, 1, 1), (2, 2, 1), (3, 3, 1), (4, 2, 2), (5, 3, 2), (7, 4, 2), (9, 3, 3), (10, 4, 3), (17, 5, 4)],
)
def test_gridify_default_shape(count, rows, cols):
    assert gridify(np.zeros((count, 2, 3))).shape == (rows * 2, cols * 3, 1)


def test_gridify_layout_fill_and_dtype():
    batch = np.arange(5 * 2 * 3).reshape(5, 2, 3) + 10
    grid = gridify(batch)
    assert grid.dtype == batch.dtype and grid.shape == (6, 6, 1)
    np.testing.assert_array_equal(grid[:2, :3, 0], batch[0])
    np.testing.assert_array_equal(grid[:2, 3:, 0], batch[1])
    np.testing.assert_array_equal(grid[4:, :3, 0], batch[4])
    np.testing.assert_array_equal(grid[4:, 3:, 0], 10)  # default fill: the minimum
    np.testing.assert_array_equal(gridify(batch, fill_value=-1)[4:, 3:, 0], -1)
    np.testing.assert_array_equal(gridify(batch, shape=(1, 5))[:, :, 0], np.concatenate(list(batch), axis=1))
    rgb = np.random.default_rng(3).normal(size=(3, 2, 2, 3))
    filled = gridify(rgb, shape=(2, 2), fill_value=[1.0, 2.0, 3.0])
    np.testing.assert_array_equal(filled[2:, 2:], np.broadcast_to([1.0, 2.0, 3.0], (2, 2, 3)))
    np.testing.assert_array_equal(gridify(rgb, shape=(2, 2))[3, 3], rgb.min(axis=(0, 1, 2)))
    np.testing.assert_array_equal(gridify(np.moveaxis(rgb, -1, 1), channels_last=False), gridify(rgb))
    with pytest.raises(ValueError, match="one value per channel"):
        gridify(rgb, fill_value=[1.0, 2.0])


def test_interval_norm_bounds():
    x = np.array([[[-3.0, 1.0]], [[2.0, 5.0]]])
    low, high = interval_norm_bounds(x)
    np.testing.assert_array_equal(low.ravel(), [-3.0, 2.0])
    np.testing.assert_array_equal(high.ravel(), [1.0, 5.0])
    assert low.shape == (2, 1, 1)
    low, high = interval_norm_bounds(x, symmetric=True)
    np.testing.assert_array_equal(high.ravel(), [3.0, 5.0])
    np.testing.assert_array_equal(low, -high)
    low, high = interval_norm_bounds(x, dim=0)
    np.testing.assert_array_equal(low, [[[-3.0, 1.0]]])


def test_heatmaps_sums_channels():
    relevance = np.random.default_rng(4).normal(size=(2, 3, 4, 3))
    maps = heatmaps(jnp.asarray(relevance))
    assert isinstance(maps, np.ndarray) and maps.shape == (2, 3, 4)
    np.testing.assert_allclose(maps, relevance.sum(-1))
    assert imgify(maps, symmetric=True, grid=True).size == (4, 2 * 3)
    with pytest.raises(ValueError, match=r"\(N, H, W, C\).*relevance\[None\]"):
        heatmaps(relevance[0])


def test_imsave_writes_png(tmp_path):
    x = np.random.default_rng(5).normal(size=(3, 6, 8))
    reference = np.asarray(imgify(x, grid=True, symmetric=True).convert("RGB"))
    targets = [tmp_path / "a.png", str(tmp_path / "no_extension"), io.BytesIO()]
    for target in targets:
        imsave(target, x, grid=True, symmetric=True)
    targets[2].seek(0)
    for target in targets:
        with Image.open(target) as img:
            assert img.format == "PNG"
            np.testing.assert_array_equal(np.asarray(img.convert("RGB")), reference)
    imsave(tmp_path / "b.png", x[0], writer_params={"optimize": True})
    assert (tmp_path / "b.png").stat().st_size > 0


def test_missing_pillow_says_how_to_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "PIL", None)
    monkeypatch.setitem(sys.modules, "PIL.Image", None)
    with pytest.raises(ImportError, match=r'pip install "jlrp\[image\]"'):
        imgify(np.zeros((2, 2)))
    with pytest.raises(ImportError, match="Pillow"):
        imsave(io.BytesIO(), np.zeros((2, 2)))
    assert palette("gray").shape == (256, 3)  # palette, gridify and heatmaps need no Pillow
    assert gridify(np.zeros((2, 2, 2))).shape == (4, 2, 1)


# ---------------------------------------------------------------------------------------------------------------
# parity with zennit (black-box oracle): zennit gets channel-first arrays, jlrp both layouts
# ---------------------------------------------------------------------------------------------------------------


def _zennit_rgb(img):
    """Pixels of a zennit image; zennit hands Pillow a numpy palette, which Pillow 13 cannot load."""
    if img.mode == "P" and isinstance(img.palette.palette, np.ndarray):
        img.palette.palette = np.asarray(img.palette.palette, dtype=np.uint8).tobytes()
    return img


def assert_same_image(reference, ours):
    reference = _zennit_rgb(reference)
    assert (ours.mode, ours.size) == (reference.mode, reference.size)
    np.testing.assert_array_equal(np.asarray(ours), np.asarray(reference))
    np.testing.assert_array_equal(np.asarray(ours.convert("RGB")), np.asarray(reference.convert("RGB")))


MODES = [
    {},
    {"symmetric": True},
    {"level": 2.0},
    {"level": 0.5, "cmap": "coldnhot", "symmetric": True},
    {"vmin": -1.0, "vmax": 2.0},
    {"vmin": -0.5},
    {"vmax": 0.3, "symmetric": True},
    {"cmap": "france", "symmetric": True, "level": 1.3},
    {"cmap": "0ff,00f,40:000,f00,c0:ff0,fff"},
]


@pytest.fixture(scope="module")
def zimage():
    return pytest.importorskip("zennit.image")


@pytest.fixture(scope="module")
def batch():
    return np.random.default_rng(6).normal(size=(5, 3, 7, 9))  # NCHW, unambiguous


@pytest.mark.crosscheck
@pytest.mark.parametrize(
    "kwargs", MODES, ids=lambda kw: ",".join(f"{k}={v}" for k, v in kw.items()) or "default"
)
def test_imgify_matches_zennit(zimage, batch, kwargs):
    nhwc = np.moveaxis(batch, 1, -1)
    heat = batch[:, 0]
    for array in [heat[0], heat[0].astype(np.float32)]:
        assert_same_image(zimage.imgify(array, **kwargs), imgify(array, **kwargs))
    assert_same_image(zimage.imgify(heat[0][None], **kwargs), imgify(heat[0][..., None], **kwargs))
    reference = zimage.imgify(batch[0], **kwargs)  # RGB, channel-first
    assert_same_image(reference, imgify(batch[0], **kwargs))
    assert_same_image(reference, imgify(nhwc[0], **kwargs))
    reference = zimage.imgify(heat, grid=True, **kwargs)
    assert_same_image(reference, imgify(heat, grid=True, **kwargs))
    assert_same_image(reference, imgify(heat[..., None], grid=True, **kwargs))
    reference = zimage.imgify(batch, grid=True, **kwargs)
    assert_same_image(reference, imgify(batch, grid=True, **kwargs))
    assert_same_image(reference, imgify(nhwc, grid=True, **kwargs))
    assert_same_image(zimage.imgify(batch, grid=(1, 5), **kwargs), imgify(nhwc, grid=(1, 5), **kwargs))
    assert_same_image(
        zimage.imgify(heat, grid=True, gridfill=99, **kwargs), imgify(heat, grid=True, gridfill=99, **kwargs)
    )


@pytest.mark.crosscheck
def test_imgify_integer_and_uint8_match_zennit(zimage):
    u8 = np.random.default_rng(7).integers(0, 256, size=(6, 8), dtype=np.uint8)
    assert_same_image(zimage.imgify(u8), imgify(u8))
    assert_same_image(zimage.imgify(u8.astype(np.int64)), imgify(u8.astype(np.int64)))
    assert_same_image(zimage.imgify(u8[None].repeat(3, 0)), imgify(u8[..., None].repeat(3, -1)))


@pytest.mark.crosscheck
def test_gridify_palette_and_bounds_match_zennit(zimage):
    rng = np.random.default_rng(8)
    for count in [1, 2, 3, 5, 7, 10]:
        nhwc = rng.normal(size=(count, 2, 4, 3))
        nchw = np.moveaxis(nhwc, -1, 1)
        np.testing.assert_array_equal(gridify(nhwc), zimage.gridify(nchw))
        np.testing.assert_array_equal(gridify(nchw), zimage.gridify(nchw))
        grey = nhwc[..., 0]
        np.testing.assert_array_equal(gridify(grey, fill_value=3.0), zimage.gridify(grey, fill_value=3.0))
        np.testing.assert_array_equal(gridify(grey, shape=(count, 2)), zimage.gridify(grey, shape=(count, 2)))
    for name in zimage.CMAPS:
        for level in [0.5, 1.0, 2.0, 3.3]:
            np.testing.assert_array_equal(palette(name, level), zimage.palette(name, level))
    x = rng.normal(size=(4, 5, 6))
    for symmetric in [False, True]:
        for dim in [None, (0,), (1, 2), (2,)]:
            ours = interval_norm_bounds(x, symmetric=symmetric, dim=dim)
            theirs = zimage.interval_norm_bounds(x, symmetric=symmetric, dim=dim)
            np.testing.assert_array_equal(ours[0], theirs[0])
            np.testing.assert_array_equal(ours[1], theirs[1])
