r"""Reference samples of concepts: relevance and activation maximisation (CRP), with receptive-field crops.

Concept Relevance Propagation (Achtibat et al., "From attribution maps to human-understandable explanations
through Concept Relevance Propagation", Nature Machine Intelligence 2023, Sec. 4.2) shows a concept (a
channel) by the data-set samples that express it most. Two rankings, as in zennit-crp:

- *relevance maximisation*: the samples whose channel relevance :math:`R_c(x) = \sum_{p} R_{p,c}(x)`
  (summed over the spatial positions ``p`` of the layer output, for the explained target) is largest: the
  samples where the model *uses* the concept most for its decision;
- *activation maximisation*: the samples whose largest activation :math:`\max_p a_{p,c}(x)` is largest.

Each reference also gets the part of the sample the concept looks at: the *receptive-field box* of the
unit (channel ``c`` at the spatial argmax ``p*`` of the ranked quantity), computed from the model as the
bounding box of the support of the unit's conditional heatmap (see :func:`references`).

:func:`references` streams a data set (resumable, with a progress bar) and returns
:class:`ReferenceSamples`; :meth:`ReferenceSamples.save` / :meth:`~ReferenceSamples.load` keep them in
one ``.npz`` file; :func:`save_grids` draws one PNG grid per concept.
"""

from __future__ import annotations

import dataclasses
import itertools
import json
import os
import re
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from .._files import atomic_path
from ..errors import UsageError, UsageTypeError
from ._relevance import attribute, tap_points

__all__ = [
    "RANKINGS",
    "LayerReferences",
    "ReferenceSamples",
    "references",
    "save_grids",
    "layer_dirname",
]

#: the two rankings of reference samples, and the prefix of their arrays
RANKINGS = {"relevance": "rel", "activation": "act"}
_NO_ID = np.iinfo(np.int64).max  # placeholder id of an empty slot while streaming (sorts last)
_FORMAT = 1
_PER_RANKING = ("ids", "values", "pos", "boxes", "batch", "row")


@dataclasses.dataclass
class LayerReferences:
    """The reference samples of the selected channels of one layer output.

    ``C`` is the number of selected channels, ``k`` the references per channel, ``S`` the number of
    spatial axes of the layer output (2 for NHWC convolutions, 0 for Dense outputs), ``B`` the number of
    spatial axes of the input (2 for NHWC images: boxes are ``(y0, x0, y1, x1)``). Slots without a sample
    (a data set with fewer than ``k`` samples) have id ``-1``, value NaN, position and box ``-1``.

    Attributes:
        key: the layer's key (its path).
        shape: the layer output's shape for one sample, e.g. ``(14, 14, 80)``.
        channels: ``(C,)`` the channel ids (along the last axis).
        relevance_sum: ``(C,)`` the channel relevance summed over every sample of the data set.
        rel_ids, rel_values: ``(C, k)`` sample ids and channel relevance :math:`R_c(x)`, descending (ties: the
            smaller id first).
        rel_pos: ``(C, k, S)`` the spatial position of the unit: the argmax of the channel's relevance in
            that sample (of ``|R|`` where no position has positive relevance).
        rel_boxes: ``(C, k, 2 B)`` the receptive-field box in the input, half-open: ``(y0, x0, y1, x1)``
            selects ``x[y0:y1, x0:x1]``; ``-1`` until computed.
        rel_heatmaps: ``(C, k, s, s)`` the unit's conditional heatmap (summed over the input channels)
            cropped to the box and scaled into an ``s x s`` square (aspect ratio kept, zero-padded), or
            ``None``.
        act_ids, act_values, act_pos, act_boxes, act_heatmaps: the same for activation maximisation
            (values: :math:`\\max_p a_{p,c}(x)`; position: the argmax of the activation).
        rel_batch, rel_row, act_batch, act_row: ``(C, k)`` where each reference lies in the data set (batch
            number, row in that batch), used to fetch it again for its box.
    """

    key: str
    shape: tuple[int, ...]
    channels: np.ndarray
    relevance_sum: np.ndarray
    rel_ids: np.ndarray
    rel_values: np.ndarray
    rel_pos: np.ndarray
    rel_boxes: np.ndarray
    rel_batch: np.ndarray
    rel_row: np.ndarray
    act_ids: np.ndarray
    act_values: np.ndarray
    act_pos: np.ndarray
    act_boxes: np.ndarray
    act_batch: np.ndarray
    act_row: np.ndarray
    rel_heatmaps: np.ndarray | None = None
    act_heatmaps: np.ndarray | None = None

    def get(self, ranking: str, name: str) -> np.ndarray | None:
        """``get('relevance', 'ids')`` is :attr:`rel_ids` (rankings: ``'relevance'``, ``'activation'``)."""
        return getattr(self, f"{_prefix(ranking)}_{name}")

    def top_channels(self, n: int | None = None) -> np.ndarray:
        """The channel ids ordered by :attr:`relevance_sum`, largest first (the first ``n``)."""
        order = np.lexsort((self.channels, -self.relevance_sum))
        return self.channels[order][:n]


def _prefix(ranking: str) -> str:
    if ranking not in RANKINGS:
        raise UsageError(f"unknown ranking {ranking!r}; use one of {', '.join(RANKINGS)}")
    return RANKINGS[ranking]


@dataclasses.dataclass
class ReferenceSamples:
    """Reference samples for every selected layer (what :func:`references` returns).

    Attributes:
        layers: ``{key: LayerReferences}`` in execution order.
        k: the number of references per channel and ranking.
        n_samples: the samples seen so far.
        input_shape: the shape of one input sample, e.g. ``(224, 224, 3)``.
        batches: the batches consumed so far (a rerun with the same state file continues after them).
        streamed: every batch has been consumed; complete: and every box computed.
        settings: the arguments that fixed the result (a resume must use the same).
    """

    layers: dict[str, LayerReferences]
    k: int
    n_samples: int = 0
    input_shape: tuple[int, ...] = ()
    batches: int = 0
    streamed: bool = False
    complete: bool = False
    settings: dict[str, Any] = dataclasses.field(default_factory=dict)

    def save(self, path: str | os.PathLike) -> None:
        """Write every array to one ``.npz`` file, atomically (a temporary file renamed into place)."""
        meta = {
            "format": _FORMAT,
            "k": self.k,
            "n_samples": self.n_samples,
            "input_shape": list(self.input_shape),
            "batches": self.batches,
            "streamed": self.streamed,
            "complete": self.complete,
            "settings": self.settings,
            "layers": [{"key": key, "shape": list(layer.shape)} for key, layer in self.layers.items()],
        }
        arrays = {"meta": np.asarray(json.dumps(meta))}
        for i, layer in enumerate(self.layers.values()):
            for field in dataclasses.fields(LayerReferences):
                value = getattr(layer, field.name)
                if isinstance(value, np.ndarray):
                    arrays[f"L{i}.{field.name}"] = value
        with atomic_path(path) as tmp:
            with open(tmp, "wb") as f:
                np.savez(f, **arrays)
                f.flush()
                os.fsync(f.fileno())

    @classmethod
    def load(cls, path: str | os.PathLike) -> ReferenceSamples:
        """Read a file written by :meth:`save`.

        Raises:
            UsageError: the file is not one :meth:`save` wrote (or another version's).
        """
        try:
            with np.load(path, allow_pickle=False) as data:
                meta = json.loads(str(data["meta"]))
                arrays = {name: data[name] for name in data.files if name != "meta"}
        except (OSError, ValueError, KeyError) as err:
            raise UsageError(f"{os.fspath(path)!r} is no reference-sample file ({err}); delete it") from err
        if meta.get("format") != _FORMAT:
            raise UsageError(f"{os.fspath(path)!r} has format {meta.get('format')}, expected {_FORMAT}")
        layers = {}
        for i, entry in enumerate(meta["layers"]):
            prefix = f"L{i}."
            fields = {n[len(prefix) :]: a for n, a in arrays.items() if n.startswith(prefix)}
            layers[entry["key"]] = LayerReferences(key=entry["key"], shape=tuple(entry["shape"]), **fields)
        return cls(
            layers=layers,
            k=meta["k"],
            n_samples=meta["n_samples"],
            input_shape=tuple(meta["input_shape"]),
            batches=meta["batches"],
            streamed=meta["streamed"],
            complete=meta["complete"],
            settings=meta["settings"],
        )


def layer_dirname(key: str) -> str:
    """A file-system-safe folder name for a layer key: ``'blocks_5/@add_0'`` -> ``'blocks_5.@add_0'``.

    ``/`` becomes ``.``, ``#`` (repeated calls) becomes ``~``, other characters outside
    ``[A-Za-z0-9_.@~-]`` become ``_``; the root module (``''``) is ``'_root'``.
    """
    name = re.sub(r"[^A-Za-z0-9_.@~-]", "_", key.replace("/", ".").replace("#", "~"))
    return name or "_root"


# --------------------------------------------------------------------------------------------------
# the data set


def _is_array(obj: Any) -> bool:
    return isinstance(obj, np.ndarray) or type(obj).__module__.startswith("jax")


class _Source:
    """Batches of a data set by number: a Sequence of batches, a re-iterable, a factory or an array."""

    def __init__(self, data: Any, batch_size: int | None) -> None:
        self.length: int | None = None
        self._indexable = self._factory = self._iterable = None
        if _is_array(data):
            array = np.asarray(data)
            size = batch_size or min(32, max(1, len(array)))
            self._indexable = [array[i : i + size] for i in range(0, len(array), size)]
        elif isinstance(data, (str, bytes, Mapping)):
            raise UsageTypeError(
                f"data must be batches (a list, a Sequence, an iterable), got {type(data).__name__}"
            )
        elif hasattr(data, "__len__") and hasattr(data, "__getitem__"):
            self._indexable = data
        elif callable(data):
            self._factory = data
        elif isinstance(data, Iterable):
            self._iterable = data
        else:
            raise UsageTypeError(
                f"data must be a Sequence of batches, an iterable of batches, a function returning a fresh "
                f"iterator of batches, or an array of samples; got {type(data).__name__}"
            )
        if self._indexable is not None:
            self.length = len(self._indexable)
        self.one_shot = self._iterable is not None and iter(self._iterable) is self._iterable

    def _iterate(self) -> Iterator[Any]:
        if self._factory is not None:
            return iter(self._factory())
        return iter(self._iterable)

    def from_batch(self, start: int) -> Iterator[tuple[int, Any]]:
        """``(number, batch)`` from batch ``start`` on (earlier batches are skipped, not loaded if indexable)."""
        if self._indexable is not None:
            for b in range(start, len(self._indexable)):
                yield b, self._indexable[b]
        else:
            yield from itertools.islice(enumerate(self._iterate()), start, None)

    def select(self, wanted: Sequence[int]) -> Iterator[tuple[int, Any]]:
        """``(number, batch)`` for the batch numbers ``wanted`` (ascending)."""
        if self._indexable is not None:
            for b in wanted:
                yield b, self._indexable[b]
            return
        todo = set(wanted)
        for b, batch in enumerate(self._iterate()):
            if b in todo:
                todo.discard(b)
                yield b, batch
            if not todo:
                return
        if todo:
            raise UsageError(
                f"the data set ended before batch {min(todo)} on the second pass; it must yield the same "
                "batches every time it is iterated"
            )


def _unpack(batch: Any, first_id: int, where: str) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    """``(x, ids, targets or None)`` of a batch ``x``, ``(x, ids)`` or ``(x, ids, targets)``."""
    ids = targets = None
    if isinstance(batch, (tuple, list)):
        if len(batch) not in (2, 3):
            raise UsageError(f"{where}: a batch is x, (x, ids) or (x, ids, targets), got {len(batch)} items")
        x, ids = batch[0], batch[1]
        targets = batch[2] if len(batch) == 3 else None
    else:
        x = batch
    x = np.asarray(x)
    if x.ndim < 2:
        raise UsageError(f"{where}: x has shape {x.shape}; a batch needs a leading batch axis (m, ...)")
    m = len(x)
    if ids is None:
        ids = np.arange(first_id, first_id + m, dtype=np.int64)
    else:
        ids = np.asarray(ids)
        if ids.shape != (m,) or not np.issubdtype(ids.dtype, np.integer):
            raise UsageError(
                f"{where}: ids must be {m} integers (one per sample), got {ids.dtype} {ids.shape}"
            )
        if (ids < 0).any():
            raise UsageError(f"{where}: ids must be >= 0, got {ids[ids < 0][:3].tolist()}")
        ids = ids.astype(np.int64)
    if targets is not None:
        targets = np.asarray(targets)
        if targets.shape != (m,) or not np.issubdtype(targets.dtype, np.integer):
            raise UsageError(
                f"{where}: targets must be {m} class indices, got {targets.dtype} {targets.shape}"
            )
    return x, ids, targets


def _pad(array: np.ndarray, size: int) -> np.ndarray:
    if len(array) >= size:
        return array
    return np.concatenate([array, np.repeat(array[-1:], size - len(array), axis=0)])


# --------------------------------------------------------------------------------------------------
# running top-k


def _empty(n_channels: int, k: int, n_spatial: int, n_box: int) -> dict[str, np.ndarray]:
    return {
        "ids": np.full((n_channels, k), _NO_ID, np.int64),
        "values": np.full((n_channels, k), -np.inf, np.float64),
        "pos": np.full((n_channels, k, n_spatial), -1, np.int64),
        "boxes": np.full((n_channels, k, n_box), -1, np.int64),
        "batch": np.full((n_channels, k), -1, np.int64),
        "row": np.full((n_channels, k), -1, np.int64),
    }


def _merge(run: dict[str, np.ndarray], new: dict[str, np.ndarray], k: int) -> None:
    """Keep the ``k`` largest values per channel of ``run`` (``(C, k)``) and ``new`` (``(C, m)``); ties by id."""
    joined = {name: np.concatenate([run[name], new[name]], axis=1) for name in run}
    # lexsort: last key first; NaN (no value) after everything, an empty slot after every real id
    order = np.lexsort((joined["ids"], -joined["values"]), axis=-1)[:, :k]
    for name, value in joined.items():
        index = order if value.ndim == 2 else order[..., None]
        run[name] = np.take_along_axis(value, index, axis=1)


def _channel_stats(
    relevance: np.ndarray, activation: np.ndarray, channels: np.ndarray
) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """``{ranking: (values (m, C), flat spatial argmax (m, C))}`` of one layer's relevance and activation."""
    m = len(relevance)
    rel = relevance[..., channels].reshape(m, -1, len(channels)).astype(np.float64)
    act = activation[..., channels].reshape(m, -1, len(channels)).astype(np.float64)
    # the relevance unit: the largest positive relevance, else (no positive relevance) the largest |R|
    unit = np.where(rel.max(axis=1) > 0, rel.argmax(axis=1), np.abs(rel).argmax(axis=1))
    return {
        "relevance": (rel.sum(axis=1), unit),
        "activation": (act.max(axis=1), act.argmax(axis=1)),
    }


# --------------------------------------------------------------------------------------------------
# receptive-field boxes


def _box(magnitude: np.ndarray, support: float) -> np.ndarray:
    """Half-open bounding box ``(*starts, *stops)`` of ``magnitude > support * max(magnitude)`` (a
    non-negative map over the input's positions); the whole extent when the map is zero."""
    peak = magnitude.max() if magnitude.size else 0.0
    if not peak > 0:
        return np.asarray([0] * magnitude.ndim + list(magnitude.shape), np.int64)
    where = np.nonzero(magnitude > support * peak)
    return np.asarray([w.min() for w in where] + [w.max() + 1 for w in where], np.int64)


def _position_maps(heat: np.ndarray, x_ndim: int) -> tuple[np.ndarray, np.ndarray]:
    """One sample's heatmap over the input's positions: ``(sum_ch |R|, sum_ch R)`` over the channel axis
    (the last; inputs ``(N, D)`` have none)."""
    if x_ndim == 2:
        return np.abs(heat), heat
    return np.abs(heat).sum(axis=-1), heat.sum(axis=-1)


def _fit(image: Any, size: int, fill: Any) -> Any:
    """A Pillow image scaled into a ``size x size`` square, aspect ratio kept, centred on ``fill``."""
    from PIL import Image, ImageOps

    resample = Image.Resampling.BILINEAR if image.mode == "F" else Image.Resampling.BICUBIC
    return ImageOps.pad(image, (size, size), method=resample, color=fill)


def _heat_cell(heat_map: np.ndarray, box: np.ndarray, size: int) -> np.ndarray:
    from jlrp.image import _pil_image

    image_module = _pil_image()
    y0, x0, y1, x1 = (int(v) for v in box)
    crop = np.ascontiguousarray(heat_map[y0:y1, x0:x1], np.float32)
    return np.asarray(_fit(image_module.fromarray(crop, mode="F"), size, 0.0), np.float32)


# --------------------------------------------------------------------------------------------------
# the pass over the data set


def _settings(
    layers: Sequence[str], k: int, channels: Any, target: Any, boxes: bool, support: float, heatmap_size: Any
) -> dict[str, Any]:
    def describe(value: Any) -> Any:
        if value is None or isinstance(value, (bool, int, float, str)):
            return value
        if isinstance(value, Mapping):
            return {str(key): describe(v) for key, v in sorted(value.items())}
        if callable(value):
            return f"callable {getattr(value, '__qualname__', type(value).__name__)}"
        return np.asarray(value).tolist()

    return {
        "layers": list(layers),
        "k": k,
        "channels": describe(channels),
        "target": describe(target),
        "boxes": boxes,
        "support": support,
        "heatmap_size": heatmap_size,
    }


def _channel_ids(channels: Any, key: str, n: int) -> np.ndarray:
    if isinstance(channels, Mapping):
        channels = channels.get(key)
    if channels is None:
        return np.arange(n, dtype=np.int64)
    ids = np.atleast_1d(np.asarray(channels))
    if ids.ndim != 1 or not np.issubdtype(ids.dtype, np.integer) or len(ids) == 0:
        raise UsageTypeError(
            f"channels must be a non-empty list of ints (or {{layer: list}}), got {channels!r}"
        )
    bad = ids[(ids < 0) | (ids >= n)]
    if bad.size:
        raise UsageError(
            f"channels {bad[:5].tolist()} are out of range: layer '{key}' has {n} channels (0..{n - 1})"
        )
    if len(np.unique(ids)) != len(ids):
        raise UsageError(f"channels for layer '{key}' repeat an id: {ids.tolist()}")
    return ids.astype(np.int64)


def references(
    explained: Any,
    *args: Any,
    layers: str | Iterable[str],
    k: int = 8,
    channels: Sequence[int] | Mapping[str, Sequence[int]] | None = None,
    target: Any = None,
    output: Any = None,
    state: str | os.PathLike | None = None,
    boxes: bool = True,
    support: float = 1e-6,
    heatmap_size: int | None = 64,
    batch_size: int | None = None,
    units_per_pass: int = 4,
    progress: bool = True,
    **kwargs: Any,
) -> ReferenceSamples:
    r"""The top-``k`` reference samples of every channel of ``layers`` over a data set (CRP, Sec. 4.2).

    Streams the data set once: one :func:`jlrp.concepts.attribute` call per batch with
    ``capture=layers`` gives every layer's relevance :math:`R` and activation :math:`a`; per channel
    ``c`` a running top-``k`` (on the host, numpy; ties: the smaller sample id first) keeps

    - by relevance (relevance maximisation): :math:`R_c(x) = \sum_p R_{p,c}(x)`, the channel's relevance
      summed over the spatial positions ``p`` for the explained target (zennit-crp's default);
    - by activation (activation maximisation): :math:`\max_p a_{p,c}(x)` (zennit-crp's default).

    Then, with ``boxes``, the receptive-field box of every reference (the batches holding references are
    read a second time). For a reference of channel ``c`` it is computed from the model: the *unit* is
    ``(p*, c)`` with ``p*`` the spatial argmax of the ranked quantity in that sample (the relevance, or
    ``|R|`` where no position has positive relevance; the activation); its conditional heatmap is the
    input relevance for the same target conditioned on that one unit (:func:`jlrp.concepts.attribute`
    with ``conditions={layer: one-hot mask over (H, W, C) at (p*, c)}`` and ``exclude_parallel=True``:
    only relevance that flows through the unit). The box is the bounding box of its support :math:`\{i : \sum_{ch} |R_{i,ch}| > \text{support} \cdot \max_i \sum_{ch} |R_{i,ch}|\}` over
    the input's positions (the input relevance summed over the input channels); a unit that carries no
    relevance (an all-zero heatmap) gets the whole input. Units are propagated in passes of
    ``batch_size`` rows (samples) x up to ``units_per_pass`` masks (the mean number of units per sample).
    Cost: the stream costs about one LRP pass per sample; the boxes one backward pass per unit, i.e.
    ``2 k`` per selected channel (restrict ``channels`` on a CPU).

    Args:
        explained: a model made by :func:`jlrp.explain`.
        *args: the explained model's arguments with the data set in place of the input ``x``:
            ``(variables, data, ...)`` for linen, ``(data, ...)`` for NNX. ``data``: a Sequence (e.g. a
            list) of batches, a function returning a fresh iterator of batches, an iterable of batches, or
            one array of samples ``(N, ...)`` (split into batches of ``batch_size``, default 32). A batch is
            ``x``, ``(x, ids)`` or ``(x, ids, targets)`` with ``x`` of shape ``(m, ...)``, ``ids`` ``m``
            non-negative ints (default: the running sample index) and ``targets`` ``m`` class indices. The
            boxes and a resume need the same batches again: a one-shot iterator only works with
            ``boxes=False`` and without interruptions.
        layers: path globs of module or op outputs (as ``capture`` of :func:`jlrp.concepts.attribute`),
            channels along the last axis (NHWC convolutions, Dense outputs).
        k: references per channel and ranking.
        channels: the channel ids to keep (every layer), ``{layer key: ids}``, or ``None`` for all.
        target: ``None`` (the predicted class of each sample), a class index, or a callable
            ``output -> starting relevance``; per-sample classes come with the batches instead.
        output: which output to explain when the model returns several (see :func:`jlrp.attribute`).
        state: an ``.npz`` path: the state is saved there after every batch (atomically) and a rerun with
            the same path and arguments continues where the last one stopped (a finished state is
            returned at once). ``None``: nothing is saved.
        boxes: compute the receptive-field boxes (and heatmaps).
        support: the relative threshold of the heatmap support (see above).
        heatmap_size: keep each reference's conditional heatmap, cropped to its box, as an ``s x s``
            array (for :func:`save_grids` overlays; needs Pillow); ``None``: not kept.
        batch_size: every batch is padded to this many samples (one compiled program for all); default
            the first batch's size.
        units_per_pass: at most this many condition masks per sample in one box pass (they share its forward
            pass and plain backward pass).
        progress: show tqdm progress bars.
        **kwargs: keyword arguments of the model call (static), as for :func:`jlrp.concepts.attribute`.

    Returns:
        :class:`ReferenceSamples` (``.layers[key].rel_ids`` etc.).

    Raises:
        UsageError: no layer matches ``layers`` (the message lists the paths), a layer called more than
            once (no single unit), channels out of range, bad batches, a ``state`` file written with other
            arguments, a one-shot iterator with ``boxes=True``, a data set that yields other samples on the
            second pass.
        UsageTypeError: arguments of the wrong type.
    """
    from tqdm.auto import tqdm

    if not isinstance(k, int) or k < 1:
        raise UsageError(f"k must be a positive int (references per channel), got {k!r}")
    if not isinstance(units_per_pass, int) or units_per_pass < 1:
        raise UsageError(f"units_per_pass must be a positive int, got {units_per_pass!r}")
    if batch_size is not None and (not isinstance(batch_size, int) or batch_size < 1):
        raise UsageError(f"batch_size must be a positive int, got {batch_size!r}")
    if heatmap_size is not None and (not isinstance(heatmap_size, int) or heatmap_size < 1):
        raise UsageError(f"heatmap_size must be a positive int or None, got {heatmap_size!r}")
    patterns = [layers] if isinstance(layers, str) else list(layers)
    if not patterns or not all(isinstance(p, str) for p in patterns):
        raise UsageTypeError(f"layers must be a path glob or a list of them, got {layers!r}")
    nnx_model = getattr(explained, "pure", None) is not None
    slot = 0 if nnx_model else 1
    if len(args) <= slot:
        raise UsageTypeError(
            "pass the data set where the input goes: references(explained, variables, data, ...) for linen, "
            "references(explained, data, ...) for NNX"
        )
    source = _Source(args[slot], batch_size)
    if source.one_shot and boxes:
        raise UsageError(
            "the data set is a one-shot iterator, but the boxes read the references' batches again; pass a "
            "list or Sequence of batches, or a function that returns a fresh iterator (or boxes=False)"
        )
    if isinstance(target, (np.ndarray, list, tuple)) and np.ndim(target) > 0:
        raise UsageError("per-sample targets come with the batches: yield (x, ids, targets)")

    def call_args(x: Any) -> tuple[Any, ...]:
        return args[:slot] + (x,) + args[slot + 1 :]

    settings = _settings(patterns, k, channels, target, boxes, support, heatmap_size)
    refs = _resume(state, settings)
    if refs is not None and refs.complete:
        return refs
    show = progress

    def save() -> None:
        if state is not None:
            refs.save(state)

    if refs is None:
        iterator = source.from_batch(0)
        peeked = []
        for b, batch in iterator:  # the first non-empty batch fixes the shapes
            peeked.append((b, batch))
            x0, _, _ = _unpack(batch, 0, f"batch {b}")
            if len(x0):
                break
        else:
            raise UsageError("the data set yields no samples")
        found = tap_points(explained, *call_args(x0[:1]), capture=patterns, output=output, **kwargs)
        selected = {key: p for key, p in found.items() if p.captured}
        if not selected:
            every = tap_points(
                explained, *call_args(x0[:1]), capture=["**", "**/@*", "@*"], output=output, **kwargs
            )
            listing = ", ".join(dict.fromkeys(p.path or "<root>" for p in every.values()))
            raise UsageError(f"layers {patterns} select no layer output; the paths are: {listing}")
        paths = [p.path for p in selected.values()]
        repeated = sorted({p for p in paths if paths.count(p) > 1})
        if repeated:
            raise UsageError(
                f"layers {repeated} are called more than once, so a channel there has no single unit; select "
                "layers called once"
            )
        n_box = 2 * (x0.ndim - 2) if x0.ndim > 2 else 2
        layer_refs = {}
        for key, point in selected.items():
            out_shape = tuple(point.shape[1:])
            if not out_shape:
                raise UsageError(
                    f"layer '{key}' has one value per sample (shape {point.shape}); it has no channels"
                )
            ids = _channel_ids(channels, key, out_shape[-1])
            run = _empty(len(ids), k, len(out_shape) - 1, n_box)
            layer_refs[key] = LayerReferences(
                key=key,
                shape=out_shape,
                channels=ids,
                relevance_sum=np.zeros(len(ids), np.float64),
                **{f"{p}_{name}": run[name].copy() for p in RANKINGS.values() for name in _PER_RANKING},
            )
        settings["batch_size"] = batch_size or len(x0)
        refs = ReferenceSamples(layers=layer_refs, k=k, input_shape=tuple(x0.shape[1:]), settings=settings)
        iterator = itertools.chain(peeked, iterator)
    else:
        iterator = source.from_batch(refs.batches)
    pad_to = refs.settings["batch_size"]
    capture = [refs.layers[key].key for key in refs.layers]

    if not refs.streamed:
        bar = tqdm(
            total=source.length,
            initial=refs.batches,
            desc="reference samples",
            unit="batch",
            disable=not show,
        )
        try:
            for b, batch in iterator:
                x, ids, targets = _unpack(batch, refs.n_samples, f"batch {b}")
                if not len(x):  # e.g. every file of the batch was unreadable
                    refs.batches = b + 1
                    save()
                    bar.update(1)
                    continue
                _check_shape(x, refs.input_shape, b)
                if targets is not None and target is not None:
                    raise UsageError("pass target= or per-sample targets in the batches, not both")
                m = len(x)
                res = attribute(
                    explained,
                    *call_args(_pad(x, max(pad_to, m))),
                    target=_pad(targets, max(pad_to, m)) if targets is not None else target,
                    output=output,
                    capture=capture,
                    **kwargs,
                )
                for key, layer in refs.layers.items():
                    relevance = np.asarray(res.relevances[key])[:m]
                    activation = np.asarray(res.activations[key])[:m]
                    stats = _channel_stats(relevance, activation, layer.channels)
                    layer.relevance_sum += stats["relevance"][0].sum(axis=0)
                    spatial = layer.shape[:-1]
                    for ranking, prefix in RANKINGS.items():
                        values, flat = stats[ranking]
                        n_channels = len(layer.channels)
                        pos = np.stack(np.unravel_index(flat.T, spatial), axis=-1) if spatial else None
                        new = {
                            "ids": np.broadcast_to(ids, (n_channels, m)),
                            "values": values.T,
                            "pos": pos if pos is not None else np.zeros((n_channels, m, 0), np.int64),
                            "boxes": np.full((n_channels, m, layer.rel_boxes.shape[-1]), -1, np.int64),
                            "batch": np.full((n_channels, m), b, np.int64),
                            "row": np.broadcast_to(np.arange(m), (n_channels, m)),
                        }
                        run = {name: getattr(layer, f"{prefix}_{name}") for name in _PER_RANKING}
                        _merge(run, new, k)
                        for name, value in run.items():
                            setattr(layer, f"{prefix}_{name}", value)
                refs.n_samples += m
                refs.batches = b + 1
                save()
                bar.update(1)
        finally:
            bar.close()
        refs.streamed = True
        for layer in refs.layers.values():
            for prefix in RANKINGS.values():
                ids = getattr(layer, f"{prefix}_ids")
                empty = ids == _NO_ID
                ids[empty] = -1
                getattr(layer, f"{prefix}_values")[empty] = np.nan
        if not boxes:
            refs.complete = True
        save()
    if boxes:
        _compute_boxes(
            refs,
            source,
            explained,
            call_args,
            target,
            output,
            support,
            heatmap_size,
            units_per_pass,
            kwargs,
            save,
            show,
        )
    refs.complete = True
    save()
    return refs


def _check_shape(x: np.ndarray, shape: tuple[int, ...], b: int) -> None:
    if tuple(x.shape[1:]) != tuple(shape):
        raise UsageError(
            f"batch {b}: samples of shape {x.shape[1:]}, the first batch had {shape}; use one size"
        )


def _resume(state: Any, settings: dict[str, Any]) -> ReferenceSamples | None:
    if state is None or not Path(state).is_file():
        return None
    refs = ReferenceSamples.load(state)
    saved = {key: value for key, value in refs.settings.items() if key != "batch_size"}
    if saved != settings:
        changed = [key for key in settings if saved.get(key) != settings[key]]
        raise UsageError(
            f"the state file {os.fspath(state)!r} belongs to a run with other arguments ({', '.join(changed)}); "
            "delete it or pass another state path"
        )
    return refs


def _compute_boxes(
    refs: ReferenceSamples,
    source: _Source,
    explained: Any,
    call_args: Callable[[Any], tuple[Any, ...]],
    target: Any,
    output: Any,
    support: float,
    heatmap_size: int | None,
    units_per_pass: int,
    kwargs: dict[str, Any],
    save: Callable[[], None],
    show: bool,
) -> None:
    """Fill ``*_boxes`` (and ``*_heatmaps``) of every reference whose box is missing."""
    from tqdm.auto import tqdm

    image_input = len(refs.input_shape) == 3
    keep_heat = heatmap_size is not None and image_input
    # units[b] = [(key, ranking, channel row, slot, row in batch)]
    units: dict[int, list[tuple[str, str, int, int, int]]] = {}
    for key, layer in refs.layers.items():
        for ranking, prefix in RANKINGS.items():
            if keep_heat and getattr(layer, f"{prefix}_heatmaps") is None:
                shape = (*layer.rel_ids.shape, heatmap_size, heatmap_size)
                setattr(layer, f"{prefix}_heatmaps", np.zeros(shape, np.float32))
            ids, boxes = getattr(layer, f"{prefix}_ids"), getattr(layer, f"{prefix}_boxes")
            batch, row = getattr(layer, f"{prefix}_batch"), getattr(layer, f"{prefix}_row")
            for c, j in zip(*np.nonzero((ids >= 0) & (boxes[..., 0] < 0))):
                units.setdefault(int(batch[c, j]), []).append((key, ranking, int(c), int(j), int(row[c, j])))
    if not units:
        return
    pad_to = refs.settings["batch_size"]
    total = sum(len(u) for u in units.values())
    # masks per row: fewer when the references are spread over many samples (no empty backward passes)
    per_layer: dict[str, list[int]] = {key: [0, 0] for key in refs.layers}
    for batch_units in units.values():
        for unit in batch_units:
            per_layer[unit[0]][0] += 1
        for key, _ in {(u[0], u[4]) for u in batch_units}:
            per_layer[key][1] += 1
    masks_per_row = {
        key: min(units_per_pass, -(-n_units // max(n_rows, 1)))
        for key, (n_units, n_rows) in per_layer.items()
    }
    bar = tqdm(total=total, desc="receptive fields", unit="unit", disable=not show)
    # pending[key] = rows of one pass: (x row, target row or None, [units])
    pending: dict[str, list[tuple[np.ndarray, Any, list]]] = {key: [] for key in refs.layers}

    def run(key: str, rows: list[tuple[np.ndarray, Any, list]]) -> None:
        layer = refs.layers[key]
        n = len(rows)
        x = _pad(np.stack([r[0] for r in rows]), pad_to)
        row_targets = [r[1] for r in rows]
        masks = np.zeros((masks_per_row[key], len(x), *layer.shape), np.float32)
        for n_row, (_, _, row_units) in enumerate(rows):
            for m_idx, (_, ranking, c, j, _) in enumerate(row_units):
                pos = tuple(layer.get(ranking, "pos")[c, j])
                masks[(m_idx, n_row, *pos, int(layer.channels[c]))] = 1.0
        tgt = target
        if row_targets[0] is not None:
            tgt = _pad(np.asarray(row_targets), len(x))
        res = attribute(
            explained,
            *call_args(x),
            target=tgt,
            output=output,
            conditions={key: masks},
            exclude_parallel=True,
            **kwargs,
        )
        heat = np.asarray(res.heatmap)
        for n_row in range(n):
            for m_idx, (_, ranking, c, j, _) in enumerate(rows[n_row][2]):
                magnitude, signed = _position_maps(heat[m_idx, n_row], x.ndim)
                box = _box(magnitude, support)
                layer.get(ranking, "boxes")[c, j] = box
                if keep_heat:
                    layer.get(ranking, "heatmaps")[c, j] = _heat_cell(signed, box, heatmap_size)
                bar.update(1)
        save()

    try:
        for b, batch in source.select(sorted(units)):
            x, ids, targets = _unpack(batch, 0, f"batch {b}")
            by_layer: dict[str, dict[int, list]] = {}
            for unit in units[b]:
                key, ranking, c, j, row = unit
                layer = refs.layers[key]
                expected = layer.get(ranking, "ids")[c, j]
                if row >= len(x) or (_given_ids(batch) and ids[row] != expected):
                    raise UsageError(
                        f"batch {b} holds other samples on the second pass (sample {expected} is missing); the "
                        "data set must yield the same batches every time"
                    )
                by_layer.setdefault(key, {}).setdefault(row, []).append(unit)
            for key, rows in by_layer.items():
                for row, row_units in rows.items():
                    step = masks_per_row[key]
                    for start in range(0, len(row_units), step):
                        chunk = row_units[start : start + step]
                        pending[key].append((x[row], None if targets is None else targets[row], chunk))
                while len(pending[key]) >= pad_to:
                    run(key, pending[key][:pad_to])
                    del pending[key][:pad_to]
        for key, rows in pending.items():
            if rows:
                run(key, rows)
    finally:
        bar.close()


def _given_ids(batch: Any) -> bool:
    return isinstance(batch, (tuple, list)) and len(batch) >= 2 and batch[1] is not None


# --------------------------------------------------------------------------------------------------
# grids


def save_grids(
    refs: ReferenceSamples,
    out: str | os.PathLike,
    images: Callable[[np.ndarray], Any] | np.ndarray,
    *,
    rankings: Sequence[str] = ("relevance",),
    overlay: bool = True,
    size: int | None = None,
    cmap: str = "bwr",
    level: float = 1.0,
    layers: Iterable[str] | None = None,
    channels: Iterable[int] | None = None,
    progress: bool = False,
) -> dict[str, dict[int, Path]]:
    """One PNG per concept, ``<out>/<layer_dirname(key)>/<channel>.png``: its reference crops side by side.

    For every ranking in ``rankings`` one row of ``k`` cells: each reference sample cropped to its
    receptive-field box, scaled into a ``size x size`` square (Pillow, aspect ratio kept, padded with grey);
    with ``overlay``, a second row with the unit's conditional heatmap (colour map ``cmap``, symmetric)
    blended over a greyscale copy of the crop with opacity :math:`|R| / \\max |R|`. Empty slots are grey.

    Args:
        refs: reference samples with boxes (:func:`references` with ``boxes=True``).
        out: the output folder.
        images: the samples as pictures in the model input's geometry (the boxes index them): a function
            ``ids -> uint8 array (len(ids), H, W[, 3])`` (or a list of such images), or one array indexed by
            id.
        rankings: ``'relevance'`` and/or ``'activation'``.
        overlay: add the heatmap rows (needs ``refs`` made with ``heatmap_size``).
        size: the cell side in pixels (default: the stored heatmaps' size, else 64; stored heatmaps of
            another size are resized).
        cmap, level: the heatmap colour map and contrast (:func:`jlrp.image.imgify`).
        layers: the layer keys to draw (default: all); channels: the channel ids (default: all).
        progress: show a tqdm progress bar.

    Returns:
        ``{key: {channel: path}}`` of the files written (atomically).

    Raises:
        UsageError: references without boxes, an overlay without stored heatmaps, unknown layers or rankings.
    """
    from tqdm.auto import tqdm

    from jlrp.image import _pil_image, imgify

    image_module = _pil_image()
    for ranking in rankings:
        _prefix(ranking)
    keys = list(refs.layers) if layers is None else list(layers)
    unknown = [key for key in keys if key not in refs.layers]
    if unknown:
        raise UsageError(f"layers {unknown} have no reference samples; they are: {', '.join(refs.layers)}")
    if len(refs.input_shape) != 3:
        raise UsageError(f"grids need image inputs (H, W, C); these samples have shape {refs.input_shape}")
    written: dict[str, dict[int, Path]] = {}
    grey = np.full(3, 128, np.uint8)
    todo = []
    for key in keys:
        layer = refs.layers[key]
        wanted = layer.channels if channels is None else np.asarray(list(channels))
        for ranking in rankings:
            if (layer.get(ranking, "boxes")[layer.get(ranking, "ids") >= 0] < 0).any():
                raise UsageError(
                    f"layer '{key}' has references without boxes; run references(..., boxes=True)"
                )
            if overlay and layer.get(ranking, "heatmaps") is None:
                raise UsageError(
                    f"layer '{key}' has no stored heatmaps for the overlay; pass overlay=False or compute the "
                    "references with heatmap_size"
                )
        rows = [int(np.nonzero(layer.channels == c)[0][0]) for c in wanted if c in layer.channels]
        todo.append((key, layer, rows))
    bar = tqdm(total=sum(len(r) for _, _, r in todo), desc="grids", unit="png", disable=not progress)
    try:
        for key, layer, rows in todo:
            cell = size or (layer.rel_heatmaps.shape[-1] if layer.rel_heatmaps is not None else 64)
            all_ids = np.unique(np.concatenate([layer.get(r, "ids")[rows].ravel() for r in rankings]))
            all_ids = all_ids[all_ids >= 0]
            pictures = dict(zip(all_ids.tolist(), _fetch(images, all_ids)))
            folder = Path(out) / layer_dirname(key)
            folder.mkdir(parents=True, exist_ok=True)
            written[key] = {}
            for c_row in rows:
                cells = []
                for ranking in rankings:
                    ids, boxes = layer.get(ranking, "ids")[c_row], layer.get(ranking, "boxes")[c_row]
                    heat = layer.get(ranking, "heatmaps")[c_row] if overlay else None
                    crops, blends = [], []
                    for j in range(refs.k):
                        if ids[j] < 0:
                            crops.append(np.broadcast_to(grey, (cell, cell, 3)))
                            blends.append(crops[-1])
                            continue
                        y0, x0, y1, x1 = (int(v) for v in boxes[j])
                        picture = pictures[int(ids[j])]
                        crop = image_module.fromarray(np.ascontiguousarray(picture[y0:y1, x0:x1])).convert(
                            "RGB"
                        )
                        crop = _fit(crop, cell, (128, 128, 128))
                        crops.append(np.asarray(crop))
                        if heat is not None:
                            blends.append(_blend(crop, heat[j], cmap, level, imgify, image_module))
                    cells += crops + (blends if heat is not None else [])
                grid = _bordered(np.stack(cells), len(cells) // refs.k, refs.k)
                path = folder / f"{int(layer.channels[c_row])}.png"
                with atomic_path(path) as tmp:
                    image_module.fromarray(grid).save(tmp, format="PNG")
                written[key][int(layer.channels[c_row])] = path
                bar.update(1)
    finally:
        bar.close()
    return written


def _fetch(images: Any, ids: np.ndarray) -> list[np.ndarray]:
    if len(ids) == 0:
        return []
    fetched = images(ids) if callable(images) else np.asarray(images)[ids]
    out = [np.asarray(p) for p in fetched]
    if len(out) != len(ids):
        raise UsageError(f"images returned {len(out)} pictures for {len(ids)} ids")
    for p in out:
        if p.dtype != np.uint8 or p.ndim not in (2, 3):
            raise UsageError(f"images must be uint8 pictures (H, W) or (H, W, 3), got {p.dtype} {p.shape}")
    return [p[..., 0] if p.ndim == 3 and p.shape[-1] == 1 else p for p in out]


def _blend(
    crop: Any, heat: np.ndarray, cmap: str, level: float, imgify: Any, image_module: Any
) -> np.ndarray:
    """The heatmap cell over a greyscale copy of the crop, opacity ``|R| / max |R|`` (the heatmap is
    resized to the crop's cell when it was stored at another size)."""
    if heat.shape != (crop.size[1], crop.size[0]):
        resized = image_module.fromarray(np.ascontiguousarray(heat, np.float32), mode="F")
        heat = np.asarray(resized.resize(crop.size, image_module.Resampling.BILINEAR))
    base = crop.convert("L").convert("RGB")
    colour = imgify(heat, symmetric=True, cmap=cmap, level=level).convert("RGB")
    peak = float(np.abs(heat).max())
    alpha = np.abs(heat) / peak if peak > 0 else np.zeros_like(heat)
    mask = image_module.fromarray((alpha * 255).astype(np.uint8), mode="L")
    return np.asarray(image_module.composite(colour, base, mask))


def _bordered(cells: np.ndarray, rows: int, cols: int, border: int = 2) -> np.ndarray:
    """Tile ``(rows * cols, s, s, 3)`` cells with a white border around each (:func:`jlrp.image.gridify`)."""
    from jlrp.image import gridify

    padded = np.pad(cells, ((0, 0), (border, border), (border, border), (0, 0)), constant_values=255)
    return gridify(padded, shape=(rows, cols), fill_value=255)
