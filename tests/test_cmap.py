"""Tests of jlrp.cmap: the colour-map language, ColorMap, palettes and the built-in maps."""

import jax.numpy as jnp
import numpy as np
import pytest

from jlrp.cmap import CMAPS, SOURCES, ColorMap, LazyColorMapCache

BUILTIN_SOURCES = {
    "bwr": "00f,80:fff,f00",
    "coldnhot": "0ff,00f,80:000,f00,ff0,fff",
    "hot": "000,f00,ff0,fff",
    "gray": "000,fff",
    "wred": "fff,f00",
    "wblue": "fff,00f",
    "cold": "000,00f,0ff",
    "france": "0055a4,80:fff,ef4135",
    "seismic": "0000d0,80:d0d0d0,d00000",
    "coolio": "00d0d0,80:d0d0d0,d000d0",
    "coleus": "00d000,80:d0d0d0,d000d0",
}


def indices(source):
    return [node.index for node in ColorMap(source).nodes]


# ---------------------------------------------------------------------------------------------------------------
# independent, hand-checkable behaviour
# ---------------------------------------------------------------------------------------------------------------


def test_two_nodes_interpolate_linearly():
    x = np.linspace(0.0, 1.0, 11)
    np.testing.assert_allclose(ColorMap("000,fff")(x), np.stack([x, x, x], -1), atol=1e-15)
    np.testing.assert_allclose(ColorMap("0f0,00f")(x), np.stack([0 * x, 1 - x, x], -1), atol=1e-15)


def test_call_shape_dtype_clipping_and_jax_input():
    cmap = ColorMap("000,fff")
    out = cmap(np.full((2, 4), 0.25, dtype=np.float32))
    assert out.shape == (2, 4, 3) and out.dtype == np.float64
    assert cmap(0.5).shape == (3,)
    np.testing.assert_array_equal(cmap(np.array([-3.0, 7.0]))[:, 0], [0.0, 1.0])
    np.testing.assert_allclose(cmap(jnp.array([0.25, 0.75]))[:, 1], [0.25, 0.75])


def test_short_and_long_colours_are_equal():
    x = np.linspace(0, 1, 33)
    np.testing.assert_array_equal(ColorMap("f80,0a5")(x), ColorMap("ff8800,00aa55")(x))
    np.testing.assert_allclose(ColorMap("0055a4,fff")(0.0), [0, 0x55 / 255, 0xA4 / 255])


def test_indexed_node_position():
    cmap = ColorMap("00f,80:fff,f00")  # white at 0x80 = 128 on the scale 0..255
    np.testing.assert_array_equal(cmap(128 / 255), [1.0, 1.0, 1.0])
    np.testing.assert_allclose(cmap(64 / 255), [0.5, 0.5, 1.0])  # half-way from blue (0) to white (128)
    np.testing.assert_allclose(cmap(0.5), [127.5 / 128, 127.5 / 128, 1.0])
    assert indices("00f,80:fff,f00") == [0, 128, 255]
    assert indices("000,8:f00,fff") == [0, 0x88, 255]  # a one-digit index is doubled like a colour channel


def test_unindexed_nodes_are_spaced_between_indexed_ones():
    assert indices("000,40:f00,0f0,00f,fff") == [0, 64, 127, 191, 255]  # 64 + 191/3 = 127.67 -> 127
    assert indices("000,111,222,333,444") == [0, 63, 127, 191, 255]
    assert indices("000,10:111,222,333,20:444,555,666") == [0, 16, 21, 26, 32, 143, 255]
    # zennit evaluates the spacing in double precision and truncates, so an exact 166 becomes 165
    assert indices("32:fdf4b3,bb2,a1b,e0:3d6") == [0, 50, 108, 165, 224, 255]


def test_end_colours_are_extended():
    cmap = ColorMap("40:f00,c0:00f")
    assert indices("40:f00,c0:00f") == [0, 64, 192, 255]
    np.testing.assert_array_equal(cmap(np.array([0.0, 0.2, 64 / 255])), np.tile([1.0, 0.0, 0.0], (3, 1)))
    np.testing.assert_array_equal(cmap(np.array([0.8, 1.0])), np.tile([0.0, 0.0, 1.0], (2, 1)))
    np.testing.assert_allclose(cmap(0.5), [1 - 63.5 / 128, 0.0, 63.5 / 128])


def test_shared_index_is_a_jump_with_the_right_hand_colour_at_the_index():
    cmap = ColorMap("000,80:f00,80:00f,fff")
    np.testing.assert_allclose(cmap(127.5 / 255), [127.5 / 128, 0, 0])
    np.testing.assert_array_equal(cmap(128 / 255), [0.0, 0.0, 1.0])
    np.testing.assert_array_equal(ColorMap("000,ff:fff,111")(1.0), ColorMap("111,222")(0.0))


def test_whitespace_case_and_trailing_comma():
    x = np.linspace(0, 1, 17)
    reference = ColorMap("00f,80:fff,f00")(x)
    for source in [" 00F , 80 : FFF ,\tf00 ", "00f,80:fff,f00,", "0000ff,80:ffffff,ff0000"]:
        np.testing.assert_array_equal(ColorMap(source)(x), reference)


@pytest.mark.parametrize(
    ("source", "match"),
    [
        ("0ff,zz0", r"position 4.*'zz0', in which 'z' is not a hexadecimal digit"),
        ("100:fff", r"position 0.*index '100' must have 1 or 2"),
        ("", "at least 2 colours"),
        ("fff", "at least 2 colours"),
        ("80:fff", "at least 2 colours"),
        (",fff,000", r"position 0.*found ','"),
        ("0ff,,00f", r"position 4.*found ','"),
        ("fff,000,,", r"position 8.*found ','"),
        ("ff,000", r"colour 'ff' must have 3 or 6"),
        ("ffff,000", r"colour 'ffff' must have 3 or 6"),
        ("80:,000", r"position 3.*a colour after the index"),
        ("000,fff:", r"position 4: index 'fff' must have 1 or 2"),
        ("000,ff:", r"position 7.*a colour after the index, found the end"),
        ("fff 000", r"position 4.*expected ',' between colours"),
        ("000;fff", r"position 3.*';' is not a hexadecimal digit"),
        ("80:fff,40:000", "must not decrease"),
        ("80:fff,000,40:000", "must not decrease"),
    ],
)
def test_malformed_sources_raise_clear_errors(source, match):
    with pytest.raises(ValueError, match=match):
        ColorMap(source)


def test_error_message_points_at_the_problem():
    with pytest.raises(ValueError) as info:
        ColorMap("0ff,zz0")
    lines = str(info.value).splitlines()
    assert lines[1].strip() == "0ff,zz0"
    assert lines[2].index("^") - lines[1].index("0") == 4


def test_source_must_be_str_and_setter_recompiles():
    with pytest.raises(TypeError):
        ColorMap(123)
    cmap = ColorMap("000,fff")
    cmap.source = "fff,000"
    assert cmap.source == "fff,000"
    np.testing.assert_array_equal(cmap(0.0), [1.0, 1.0, 1.0])
    with pytest.raises(ValueError):
        cmap.source = "nonsense"
    assert cmap.source == "fff,000"  # a failed assignment keeps the old map
    assert ColorMap("000,fff") == ColorMap("000,fff") and "000,fff" in repr(ColorMap("000,fff"))


def test_palette_levels():
    gray = ColorMap("000,fff")
    pal = gray.palette()
    assert pal.shape == (256, 3) and pal.dtype == np.uint8
    np.testing.assert_array_equal(pal[:, 0], np.arange(256))
    np.testing.assert_array_equal(gray.palette(level=0.0), np.full((256, 3), 127))  # centre colour only
    steep = gray.palette(level=2.0)[:, 0].astype(int)
    np.testing.assert_array_equal(steep, np.clip(np.floor((np.arange(256) - 127.5) * 2 + 127.5), 0, 255))
    wide = gray.palette(level=0.5)[:, 0].astype(int)
    assert (wide[0], wide[255]) == (63, 191)
    # node colours come out exactly even where floating point would give 254.999...
    assert ColorMap("00f,80:fff,f00").palette()[128].tolist() == [255, 255, 255]


def test_builtin_sources_and_names():
    assert SOURCES == BUILTIN_SOURCES
    assert sorted(CMAPS) == sorted(BUILTIN_SOURCES) and len(CMAPS) == 11
    for name, source in BUILTIN_SOURCES.items():
        assert isinstance(CMAPS[name], ColorMap) and CMAPS[name].source == source
    assert CMAPS["bwr"] is CMAPS["bwr"]  # compiled once, cached
    np.testing.assert_array_equal(CMAPS["bwr"](np.array([0.0, 1.0])), [[0, 0, 1], [1, 0, 0]])


def test_lazy_cache_is_a_mutable_mapping():
    cache = LazyColorMapCache({"a": "000,fff"})
    cache["b"] = "fff,000"
    cache["c"] = ColorMap("f00,0f0")
    assert list(cache) == ["a", "b", "c"] and len(cache) == 3
    assert cache["c"].source == "f00,0f0"
    del cache["a"]
    with pytest.raises(KeyError, match="known names: b, c"):
        cache["a"]
    with pytest.raises(ValueError):
        cache["d"] = "not a map"
    assert "d" not in cache


# ---------------------------------------------------------------------------------------------------------------
# parity with zennit (black-box oracle)
# ---------------------------------------------------------------------------------------------------------------


def _random_sources(count, seed=0):
    rng = np.random.default_rng(seed)
    digits = list("0123456789abcdef")
    sources = []
    while len(sources) < count:
        size = int(rng.integers(2, 9))
        positions = np.sort(rng.integers(0, 256, size=size))
        nodes = []
        for position in positions:
            colour = "".join(rng.choice(digits, size=int(rng.choice([3, 6]))))
            if rng.random() < 0.4:
                index = f"{position:02x}" if rng.random() < 0.8 else f"{position >> 4:x}"
                nodes.append(f"{index}:{colour}")
            else:
                nodes.append(colour)
        sources.append(",".join(nodes))
    return sources


@pytest.mark.crosscheck
@pytest.mark.parametrize("name", sorted(BUILTIN_SOURCES))
def test_builtin_maps_match_zennit(name):
    zimage = pytest.importorskip("zennit.image")
    reference = zimage.CMAPS[name]
    assert reference.source == CMAPS[name].source
    rng = np.random.default_rng(1)
    for x in [np.linspace(0, 1, 257), np.arange(256) / 255, rng.uniform(-0.2, 1.2, size=(7, 11, 3))]:
        np.testing.assert_allclose(CMAPS[name](x), reference(x), rtol=0, atol=1e-12)
    for level in [0.0, 0.25, 0.5, 0.75, 1.0, 1.3, 2.0, 3.7, 10.0, -1.0]:
        np.testing.assert_array_equal(CMAPS[name].palette(level=level), reference.palette(level=level))


@pytest.mark.crosscheck
def test_random_sources_match_zennit():
    zcmap = pytest.importorskip("zennit.cmap")
    x = np.concatenate([np.linspace(0, 1, 257), np.random.default_rng(2).uniform(-0.1, 1.1, 300)])
    for source in _random_sources(300):
        try:
            reference = zcmap.ColorMap(source)
        except RuntimeError:
            with pytest.raises(ValueError):
                ColorMap(source)
            continue
        ours = ColorMap(source)
        np.testing.assert_allclose(ours(x), reference(x), rtol=0, atol=1e-12, err_msg=source)
        node_indices = np.array([node.index for node in ours.nodes])
        jumps = node_indices[1:][np.diff(node_indices) == 0]
        for level in [0.5, 1.0, 2.0]:
            # zennit truncates float results, so a colour that is exactly an integer can come out one lower
            # there; jlrp gives exact integers exactly. Built-in maps agree exactly (test above). Entries that
            # sit exactly on a jump (two nodes at one index) depend on float rounding of the position.
            position = np.clip((np.arange(256) / 255 - 0.5) * level + 0.5, 0, 1) * 255
            on_jump = np.isclose(position[:, None], jumps[None, :], rtol=0, atol=1e-6).any(axis=1)
            difference = ours.palette(level).astype(int) - reference.palette(level).astype(int)
            assert np.all(np.abs(difference[~on_jump]) <= 1), source


@pytest.mark.crosscheck
@pytest.mark.parametrize(
    "source", ["0ff,zz0", "100:fff", "", "fff", ",fff,000", "0ff,,00f", "80:fff,40:000", "000,fff:", "ff,000"]
)
def test_zennit_rejects_the_same_sources(source):
    zcmap = pytest.importorskip("zennit.cmap")
    with pytest.raises(RuntimeError):
        zcmap.ColorMap(source)
    with pytest.raises(ValueError):
        ColorMap(source)
