"""Colour maps from a small colour-map specification language (zennit's cmsl).

A colour map is written as comma-separated nodes, for example ``'0ff,00f,80:000,f00,ff0,fff'``:

- each node is a colour in hexadecimal RGB, with either one digit per channel (``'f80'`` is the same as
  ``'ff8800'``) or two digits per channel (``'ff8800'``);
- a node may be prefixed by a hexadecimal *index* of one or two digits and a colon (``'80:000'``), the
  node's position on the scale ``00`` .. ``ff`` (0 .. 255); a one-digit index is doubled like a colour
  channel (``'8:'`` is ``'88:'``, i.e. 136);
- an unindexed first node sits at ``00``, an unindexed last node at ``ff``; runs of unindexed nodes between
  two positioned nodes ``a`` and ``b`` are spaced evenly between them: the ``m``-th of ``k`` such
  nodes sits at ``a * (1 - t) + b * t`` with ``t = m * (1 / (k + 1))``, evaluated in double precision and
  truncated to an integer (as zennit does, so ``32:..,..,..,e0:..`` puts the inner nodes at 108 and 165);
- indices must not decrease from left to right; two nodes may share an index, which gives a jump (at the
  shared index itself the colour is the right-hand node's);
- if the first node's index is above ``00`` (or the last one's below ``ff``), its colour is extended to
  the end of the scale;
- whitespace around nodes, commas and colons is ignored, one trailing comma is allowed, and at least two
  colours are needed.

Values in [0, 1] are mapped to the scale 0 .. 255 (``x * 255``) and interpolated linearly between the
neighbouring nodes, as zennit's :py:class:`zennit.cmap.ColorMap` does (the same values to within float
rounding; :py:meth:`ColorMap.palette` of the built-in maps is bit-identical to zennit's).
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, MutableMapping
from typing import Any, NamedTuple

import numpy as np

from .errors import UnknownNameError, UsageError, UsageTypeError

__all__ = ["CMAPS", "ColorMap", "ColorNode", "LazyColorMapCache", "SOURCES"]

SOURCES: dict[str, str] = {
    "gray": "000,fff",
    "wred": "fff,f00",
    "wblue": "fff,00f",
    "hot": "000,f00,ff0,fff",
    "cold": "000,00f,0ff",
    "coldnhot": "0ff,00f,80:000,f00,ff0,fff",
    "bwr": "00f,80:fff,f00",
    "france": "0055a4,80:fff,ef4135",
    "seismic": "0000d0,80:d0d0d0,d00000",
    "coolio": "00d0d0,80:d0d0d0,d000d0",
    "coleus": "00d000,80:d0d0d0,d000d0",
}
"""The source code of the eleven built-in colour maps (the same strings as zennit's)."""

_SCALE = 255


class ColorNode(NamedTuple):
    """A node of a compiled colour map.

    Attributes:
        index: Position of the node on the scale 0 .. 255.
        value: RGB colour of the node, three floats in [0, 1].
    """

    index: int
    value: np.ndarray


def _syntax_error(source: str, pos: int, message: str) -> ValueError:
    shown = "".join(" " if char.isspace() else char for char in source)  # keep the caret aligned
    pointer = " " * pos + "^"
    return ValueError(
        f"Invalid colour-map source at position {pos}: {message}\n  {shown}\n  {pointer}\n"
        "A colour map is a comma-separated list of nodes '[II:]RGB' or '[II:]RRGGBB' with hexadecimal "
        "colours and an optional hexadecimal index II (00..ff), e.g. '00f,80:fff,f00'."
    )


_HEX_DIGITS = frozenset("0123456789abcdefABCDEF")


def _tokenize(source: str) -> list[tuple[str, str, int]]:
    """Split ``source`` into (kind, text, position) tokens; kinds are 'hex', ',', ':' and 'bad'."""
    tokens = []
    pos, size = 0, len(source)
    while pos < size:
        char = source[pos]
        if char.isspace():
            pos += 1
        elif char in ",:":
            tokens.append((char, char, pos))
            pos += 1
        else:
            start = pos
            is_hex = char in _HEX_DIGITS
            while pos < size and not source[pos].isspace() and source[pos] not in ",:":
                is_hex = is_hex and source[pos] in _HEX_DIGITS
                pos += 1
            tokens.append(("hex" if is_hex else "bad", source[start:pos], start))
    tokens.append(("end", "", size))
    return tokens


def _parse_hex_colour(text: str) -> np.ndarray:
    if len(text) == 3:
        channels = [int(char * 2, 16) for char in text]
    else:
        channels = [int(text[i : i + 2], 16) for i in range(0, 6, 2)]
    return np.asarray(channels, dtype=np.float64) / _SCALE


def _parse(source: str) -> list[tuple[int | None, np.ndarray]]:
    """Parse ``source`` into a list of (index or None, colour) pairs, raising ``ValueError`` on bad syntax."""
    tokens = _tokenize(source)
    nodes: list[tuple[int | None, np.ndarray]] = []
    i = 0

    def unexpected(token: tuple[str, str, int], wanted: str) -> ValueError:
        kind, text, pos = token
        if kind == "bad":
            offset = next(i for i, char in enumerate(text) if char not in _HEX_DIGITS)
            return _syntax_error(
                source,
                pos + offset,
                f"expected {wanted}, found {text!r}, in which {text[offset]!r} is not a hexadecimal digit",
            )
        if kind == "end":
            found = "the end of the source"
        else:
            found = repr(text)
        return _syntax_error(source, pos, f"expected {wanted}, found {found}")

    while tokens[i][0] != "end":
        kind, text, pos = tokens[i]
        if kind != "hex":
            raise unexpected(tokens[i], "a colour or an index")
        index = None
        if tokens[i + 1][0] == ":":
            if len(text) not in (1, 2):
                raise _syntax_error(
                    source, pos, f"index {text!r} must have 1 or 2 hexadecimal digits (00..ff)"
                )
            index = int(text * 2 if len(text) == 1 else text, 16)
            i += 2
            kind, text, pos = tokens[i]
            if kind != "hex":
                raise unexpected(tokens[i], "a colour after the index")
        if len(text) not in (3, 6):
            raise _syntax_error(
                source, pos, f"colour {text!r} must have 3 or 6 hexadecimal digits (RGB or RRGGBB)"
            )
        nodes.append((index, _parse_hex_colour(text)))
        i += 1
        if tokens[i][0] == ",":
            i += 1
        elif tokens[i][0] != "end":
            raise unexpected(tokens[i], "',' between colours")
    if len(nodes) < 2:
        raise UsageError(
            f"A colour map needs at least 2 colours, but {source!r} has {len(nodes)}; "
            "write e.g. '000,fff' for a map from black to white."
        )
    return nodes


def _place(source: str, parsed: list[tuple[int | None, np.ndarray]]) -> list[ColorNode]:
    """Give every node its index, check their order and extend the end colours to 0 and 255."""
    indices = [index for index, _ in parsed]
    if indices[0] is None:
        indices[0] = 0
    if indices[-1] is None:
        indices[-1] = _SCALE
    known = [i for i, index in enumerate(indices) if index is not None]
    for left, right in zip(known[:-1], known[1:], strict=True):
        low, high = indices[left], indices[right]
        if high < low:
            raise UsageError(
                f"Colour-map indices must not decrease from left to right, but in {source!r} "
                f"node {left + 1} is at {low:02x} and node {right + 1} at {high:02x}."
            )
        count = right - left
        for m in range(1, count):
            # evaluated in double precision and truncated, which is what zennit does
            weight = m * (1.0 / count)
            indices[left + m] = int(low * (1.0 - weight) + high * weight)
    nodes = [ColorNode(int(index), colour) for index, (_, colour) in zip(indices, parsed, strict=True)]
    if nodes[0].index > 0:
        nodes.insert(0, ColorNode(0, nodes[0].value))
    if nodes[-1].index < _SCALE:
        nodes.append(ColorNode(_SCALE, nodes[-1].value))
    return nodes


class ColorMap:
    """A linear colour map compiled from colour-map specification language source.

    See the module documentation for the language. Calling the map turns values in [0, 1] into RGB.

    Args:
        source: Source code of the colour map, e.g. ``'00f,80:fff,f00'``.

    Raises:
        ValueError: If ``source`` is not valid colour-map source; the message says what is wrong and where.

    Example:
        >>> cmap = ColorMap('000,fff')
        >>> cmap(np.array([0.0, 0.25, 1.0]))[:, 0]
        array([0.  , 0.25, 1.  ])
    """

    def __init__(self, source: str) -> None:
        self.source = source

    @property
    def source(self) -> str:
        """The source code of the colour map; assigning a new string recompiles the map."""
        return self._source

    @source.setter
    def source(self, value: str) -> None:
        if not isinstance(value, str):
            raise UsageTypeError(f"Colour-map source must be a str, got {type(value).__name__}.")
        nodes = _place(value, _parse(value))
        self._source = value
        self._nodes = tuple(nodes)
        self._indices = np.asarray([node.index for node in nodes], dtype=np.float64)
        self._colors255 = np.round(np.stack([node.value for node in nodes]) * _SCALE)

    @property
    def nodes(self) -> tuple[ColorNode, ...]:
        """The compiled nodes (index on 0 .. 255 and RGB colour), including the extended end nodes."""
        return self._nodes

    def _interpolate(self, pos: np.ndarray) -> np.ndarray:
        """Colours (on the scale 0 .. 255) at positions ``pos`` (on the scale 0 .. 255)."""
        indices, colors = self._indices, self._colors255
        left = np.clip(np.searchsorted(indices, pos, side="right") - 1, 0, len(indices) - 2)
        low, high = indices[left], indices[left + 1]
        width = high - low
        # a zero-width segment only occurs at the very end (two nodes at 255): take the right-hand colour
        frac = np.where(width > 0, (pos - low) / np.where(width > 0, width, 1.0), 1.0)[..., None]
        start = colors[left]
        return start + (colors[left + 1] - start) * frac

    def __call__(self, x: Any) -> np.ndarray:
        """Map values to RGB.

        Args:
            x: Array-like (numpy or jax) of any shape; values are clipped to [0, 1].

        Returns:
            A float64 numpy array of shape ``x.shape + (3,)`` with RGB values in [0, 1].
        """
        pos = np.clip(np.asarray(x, dtype=np.float64), 0.0, 1.0) * _SCALE
        return self._interpolate(pos) / _SCALE

    def palette(self, level: float = 1.0) -> np.ndarray:
        """Create an 8-bit palette of 256 colours.

        Entry ``i`` is the colour of the value ``(i / 255 - 0.5) * level + 0.5`` (clipped to [0, 1]), with
        channels scaled to 0 .. 255 and rounded down; channel values within 1e-9 of an integer count as that
        integer, so node colours come out exactly. The built-in maps give zennit's palettes bit for bit; for
        other maps an entry can be one higher than zennit's, where zennit's floating-point result falls
        just below an integer.

        Args:
            level: Contrast of the palette. 1.0 uses the map as it is; values below 1 use a narrower range
                of the map around its centre (0 gives the centre colour only); values above 1 reach the
                ends of the map earlier, with a steeper transition around the centre.

        Returns:
            A ``uint8`` numpy array of shape (256, 3).
        """
        values = (np.arange(256, dtype=np.float64) / _SCALE - 0.5) * float(level) + 0.5
        pos = np.clip(values, 0.0, 1.0) * _SCALE
        colors = self._interpolate(pos)
        nearest = np.round(colors)
        colors = np.where(np.abs(colors - nearest) < 1e-9, nearest, np.floor(colors))
        return np.clip(colors, 0, _SCALE).astype(np.uint8)

    def __repr__(self) -> str:
        return f"ColorMap({self._source!r})"

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, ColorMap):
            return NotImplemented
        return self._source == other._source

    def __hash__(self) -> int:
        return hash(self._source)


class LazyColorMapCache(MutableMapping):
    """Dict-like store of colour-map sources, compiled lazily and cached on first lookup.

    Args:
        sources: Mapping from names to colour-map source code.
    """

    def __init__(self, sources: Mapping[str, str]) -> None:
        self._sources: dict[str, str] = dict(sources)
        self._compiled: dict[str, ColorMap] = {}

    def __getitem__(self, name: str) -> ColorMap:
        if name not in self._sources:
            raise UnknownNameError(
                f"Unknown colour map {name!r}; known names: {', '.join(sorted(self._sources))}."
            )
        if name not in self._compiled:
            self._compiled[name] = ColorMap(self._sources[name])
        return self._compiled[name]

    def __setitem__(self, name: str, value: str | ColorMap) -> None:
        source = value.source if isinstance(value, ColorMap) else value
        compiled = ColorMap(source)  # fail early on bad source
        self._sources[name] = source
        self._compiled[name] = compiled

    def __delitem__(self, name: str) -> None:
        del self._sources[name]
        self._compiled.pop(name, None)

    def __iter__(self) -> Iterator[str]:
        return iter(self._sources)

    def __len__(self) -> int:
        return len(self._sources)

    def __repr__(self) -> str:
        return f"LazyColorMapCache({self._sources!r})"


CMAPS: LazyColorMapCache = LazyColorMapCache(SOURCES)
"""The built-in colour maps by name: ``bwr``, ``coldnhot``, ``hot``, ``gray``, ``wred``, ``wblue``, ``cold``,
``france``, ``seismic``, ``coolio`` and ``coleus``."""
