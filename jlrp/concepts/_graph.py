"""Attribution graph (CRP): the lower-layer concepts that contribute most to a concept.

For a concept ``u`` (a channel of one layer) and the next lower layer, the relevance of every lower
concept ``l`` *conditioned on* ``u`` (Achtibat et al., "From attribution maps to human-understandable
explanations through Concept Relevance Propagation", Nature Machine Intelligence 2023, Eq. 5-6 and the
"attribution graph" of Section 4): :math:`R(l \\mid u) = \\sum_{i \\in l} R_i(x \\mid u)`, the part of
``u``'s relevance that ``l`` passes on. The top ``k`` lower concepts become the nodes of the next level;
the graph grows one layer at a time.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any

import jax.numpy as jnp
import numpy as np

from ..errors import UnknownNameError, UsageError, UsageTypeError
from ..targets import OutputSelector, TargetLike
from ._concept import ChannelConcept, HeadConcept
from ._relevance import attribute

__all__ = ["AttributionGraph", "GraphEdge", "GraphNode", "attribution_graph"]


@dataclasses.dataclass(frozen=True)
class GraphNode:
    """A concept of the graph: ``concept`` (channel or head id) of the output of ``layer``, with its
    ``relevance`` in the unconditioned attribution (how much of the explained output it carries)."""

    layer: str
    concept: int
    relevance: float


@dataclasses.dataclass(frozen=True)
class GraphEdge:
    """``lower`` contributes ``relevance`` to ``upper``: ``R(lower | upper)``; nodes as ``(layer, concept)``."""

    upper: tuple[str, int]
    lower: tuple[str, int]
    relevance: float


@dataclasses.dataclass(frozen=True)
class AttributionGraph:
    """What :func:`attribution_graph` returns. ``nodes`` level by level (the root first), ``edges``
    grouped by upper node, each group in descending relevance."""

    root: tuple[str, int]
    nodes: tuple[GraphNode, ...]
    edges: tuple[GraphEdge, ...]

    def node(self, layer: str, concept: int) -> GraphNode:
        """The node of ``concept`` at ``layer``.

        Raises:
            UnknownNameError: (a ``KeyError``) the graph does not hold it.
        """
        for n in self.nodes:
            if (n.layer, n.concept) == (layer, concept):
                return n
        raise UnknownNameError(f"the graph has no node for concept {concept} of '{layer}'")

    def children(self, layer: str, concept: int) -> tuple[GraphEdge, ...]:
        """The edges from the node ``(layer, concept)`` down, most relevant first."""
        return tuple(e for e in self.edges if e.upper == (layer, concept))

    def table(self) -> str:
        """A small text table: the nodes, then the edges ``upper -> lower  R(lower | upper)``."""
        nodes = [("node", "relevance")] + [
            (f"{n.layer}:{n.concept}", f"{n.relevance:.6g}") for n in self.nodes
        ]
        edges = [("upper -> lower", "R(lower | upper)")] + [
            (f"{e.upper[0]}:{e.upper[1]} -> {e.lower[0]}:{e.lower[1]}", f"{e.relevance:.6g}")
            for e in self.edges
        ]
        width = max(len(a) for a, _ in nodes + edges)
        lines = [f"{a:<{width}}  {b:>16}" for a, b in nodes] + [""]
        return "\n".join(lines + [f"{a:<{width}}  {b:>16}" for a, b in edges])

    def to_dict(self) -> dict[str, Any]:
        """Plain Python data (JSON-serialisable): ``{'root', 'nodes', 'edges'}``."""
        return {
            "root": list(self.root),
            "nodes": [dataclasses.asdict(n) for n in self.nodes],
            "edges": [
                {"upper": list(e.upper), "lower": list(e.lower), "relevance": e.relevance} for e in self.edges
            ],
        }


def _scores(relevances: dict[str, Any], path: str, kind: Any, batch_axes: int) -> np.ndarray:
    """The concept relevances at ``path`` summed over the batch (and over repeated calls of ``path``)."""
    keys = [key for key in relevances if key == path or key.startswith(path + "#")]
    total = sum(kind.attribute(relevances[key], batch_axes=batch_axes) for key in keys)
    return np.asarray(jnp.sum(total, axis=batch_axes - 1), np.float64)


def attribution_graph(
    explained: Any,
    *args: Any,
    target: TargetLike = None,
    concept: tuple[str, int],
    layers: Sequence[str],
    k: int = 3,
    concept_kind: ChannelConcept | HeadConcept | None = None,
    exclude_parallel: bool = True,
    output: OutputSelector = None,
    batch_size: int | None = None,
    **kwargs: Any,
) -> AttributionGraph:
    """The lower-layer concepts that contribute most to ``concept``, layer by layer (CRP).

    Level by level, with one :func:`jlrp.concepts.attribute` call per level (all nodes of the level as a
    stack of condition masks, plus one unconditioned call for the node relevances): for every node ``u``
    at layer ``layers[i-1]`` (the root's layer for ``i = 0``), the relevance of each concept ``l`` of
    ``layers[i]`` conditioned on ``u`` alone, ``R(l | u)``; the ``k`` largest become edges and their
    concepts the nodes of level ``i + 1``::

        graph = concepts.attribution_graph(explained, variables, x[:1], target=3,
                                           concept=('features_28', 42), layers=['features_26', 'features_24'])
        print(graph.table())

    Relevances are summed over the batch: pass one sample for the graph of one prediction (as
    zennit-crp's ``attribute_graph``), or a batch for a graph of them all.

    Args:
        explained: a model made by :func:`jlrp.explain`.
        *args: the explained model's arguments (``(variables, x, ...)`` linen, ``(x, ...)`` NNX).
        target: what to explain, as for :func:`jlrp.attribute`.
        concept: ``(layer path, concept id)``, the root.
        layers: lower layer (module or op) paths, top-down, one per level below the root.
        k: edges per node (the most relevant lower concepts, by signed relevance).
        concept_kind: how a layer splits into concepts (:class:`ChannelConcept`, :class:`HeadConcept`);
            ``None``: ``ChannelConcept()`` (channels on the last axis).
        exclude_parallel: as for :func:`jlrp.concepts.attribute` (``True``: only relevance that passes
            ``u`` counts, none that bypasses it through a skip connection).
        output: which output to explain when the model returns several.
        batch_size: as for :func:`jlrp.concepts.attribute`.
        **kwargs: keyword arguments of the model call.

    Returns:
        An :class:`AttributionGraph` (``.table()``, ``.to_dict()``).

    Raises:
        UsageError: ``k < 1``, no or repeated layers, a concept id out of range, and whatever
            :func:`jlrp.concepts.attribute` raises (unknown paths list the paths).
        UsageTypeError: ``concept`` not ``(str, int)``, or ``layers`` not a list of paths.
    """
    if not (
        isinstance(concept, tuple)
        and len(concept) == 2
        and isinstance(concept[0], str)
        and isinstance(concept[1], int | np.integer)
    ):
        raise UsageTypeError(f"concept must be (layer path, concept id), got {concept!r}")
    if isinstance(layers, str) or not all(isinstance(p, str) for p in layers):
        raise UsageTypeError(f"layers must be a list of layer paths, top-down, got {layers!r}")
    paths = [concept[0], *layers]
    if not layers or len(set(paths)) != len(paths):
        raise UsageError(
            f"layers must name at least one layer below {concept[0]!r}, each once; got {layers!r}"
        )
    if not isinstance(k, int) or k < 1:
        raise UsageError(f"k must be a positive int (edges per node), got {k!r}")
    concept_kind = ChannelConcept() if concept_kind is None else concept_kind
    common = {"target": target, "output": output, **kwargs}
    plain = attribute(explained, *args, capture=paths, **common)
    node_scores = {p: _scores(plain.relevances, p, concept_kind, 1) for p in paths}
    root = (concept[0], int(concept[1]))
    if not 0 <= root[1] < len(node_scores[root[0]]):
        raise UsageError(
            f"concept {root[1]} out of range: {root[0]!r} has {len(node_scores[root[0]])} concepts"
        )
    nodes = [GraphNode(root[0], root[1], float(node_scores[root[0]][root[1]]))]
    edges: list[GraphEdge] = []
    level = [root[1]]
    for upper, lower in zip(paths[:-1], paths[1:]):
        res = attribute(
            explained,
            *args,
            capture=lower,
            conditions={upper: concept_kind.masks(level, plain.relevances[upper])},
            exclude_parallel=exclude_parallel,
            batch_size=batch_size,
            **common,
        )
        scores = _scores(res.relevances, lower, concept_kind, 2)  # (len(level), concepts of lower)
        found: list[int] = []
        for u, row in zip(level, scores):
            for c in np.argsort(-row, kind="stable")[: min(k, len(row))]:
                edges.append(GraphEdge((upper, u), (lower, int(c)), float(row[c])))
                found += [int(c)] if int(c) not in found else []
        nodes += [GraphNode(lower, c, float(node_scores[lower][c])) for c in found]
        level = found
    return AttributionGraph(root, tuple(nodes), tuple(edges))
