"""Parity with zennit-crp 0.6.0: CRP conditional heatmaps, layer relevances and channel relevances.

zennit-crp (the PyTorch package of Achtibat et al. 2023) declares ``zennit<=0.4.6`` and is no longer
maintained, but its ``CondAttribution`` and ``ChannelConcept`` import and run with torch 2.14.1 and
zennit 1.0.0 (they need only torch, zennit, numpy and tqdm; matplotlib only for its visualisation
module). It is installed with ``pip install --no-deps zennit-crp==0.6.0`` (README's test command) and
runs in this process: it only registers hooks inside its own context managers, it patches nothing.

A small torchvision-style VGG (random weights, non-zero biases, float64 on both sides; one float32
case) with identical weights in torch and Flax (``jlrp.models.from_torchvision`` /
``load_torchvision_nnx``), composite EpsilonPlusFlat on both sides:

- conditional heatmaps ``CondAttribution(data, [{layer: [c], 'y': [target]}, ...])`` for several
  channels of two layers, one layer at a time and both layers at once, with and without
  ``exclude_parallel``, against ``jlrp.concepts.attribute(..., conditions=...)``;
- relevances at recorded layers (``record_layer``) against ``capture``;
- ``crp.concepts.ChannelConcept.attribute`` (with and without ``abs_norm``) against
  ``jlrp.concepts.ChannelConcept().attribute``.

One behaviour of zennit-crp under torch 2.x differs from what it documents, and the test pins it:
the relevance it records at a *conditioned* layer is taken after the layer's own mask (torch 2 runs
``retain_grad`` hooks after all other tensor hooks) and, with ``exclude_parallel=True``, twice that
(the retained gradient is accumulated once by its ``autograd.grad`` call and once by its
``backward`` call that starts at the same tensor). jlrp returns the relevance arriving at the layer,
before its mask. Heatmaps and the relevance at every other layer are unaffected.
"""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import jlrp
import jlrp.models as jm
from jlrp import composites, concepts

torch = pytest.importorskip("torch")
torchvision = pytest.importorskip("torchvision")
pytest.importorskip("zennit")
from test_zennit_parity import _randomise_batchnorm  # noqa: E402
from zennit.composites import EpsilonPlusFlat  # noqa: E402

try:
    from crp.attribution import CondAttribution
    from crp.concepts import ChannelConcept as CrpChannelConcept
except ImportError as error:  # with torch and zennit present, a missing zennit-crp is a failure
    CondAttribution = CrpChannelConcept = None
    _MISSING = f"zennit-crp is not importable ({error}): pip install --no-deps zennit-crp==0.6.0"

pytestmark = pytest.mark.crosscheck

SIZE = 32
CLASSES = 10
CFG = (8, "M", 16, "M", 32, "M")  # convs: features.0, .3, .6
HIDDEN = 24
TARGETS = np.array([3, 7])
# two conditioned layers (torch name, linen path) and the channels explained at each
LOWER = ("features.3", "features_3", [1, 5, 9, 13])
UPPER = ("features.6", "features_6", [0, 9, 17, 25])
RECORD = [("features.0", "features_0"), ("features.3", "features_3"), ("features.6", "features_6")]
RECORD += [("classifier.0", "classifier_0")]


@pytest.fixture(scope="module")
def crp():
    if CondAttribution is None:
        pytest.fail(_MISSING, pytrace=False)


_PAIRS: dict[str, tuple] = {}


def _pair(dtype):
    """The torch VGG and its linen twin with the same weights, and a batch of inputs."""
    name = np.dtype(dtype).name
    if name not in _PAIRS:
        torch_dtype = torch.float64 if name == "float64" else torch.float32
        torch.manual_seed(0)
        tv = torchvision.models.VGG(torchvision.models.vgg.make_layers(list(CFG)), num_classes=CLASSES)
        channels = [v for v in CFG if v != "M"][-1]
        tv.classifier = torch.nn.Sequential(
            torch.nn.Linear(channels * 49, HIDDEN),
            torch.nn.ReLU(),
            torch.nn.Dropout(),
            torch.nn.Linear(HIDDEN, HIDDEN),
            torch.nn.ReLU(),
            torch.nn.Dropout(),
            torch.nn.Linear(HIDDEN, CLASSES),
        )
        tv = tv.double().eval()
        _randomise_batchnorm(tv, torch.Generator().manual_seed(1))  # here: random biases
        tv = tv.to(torch_dtype)
        kw = {"num_classes": CLASSES, "hidden_features": HIDDEN, "dtype": dtype, "param_dtype": dtype}
        model = jm.VGG(CFG, **kw)
        variables = jm.from_torchvision(tv.state_dict(), model, dtype=dtype, input_shape=(1, SIZE, SIZE, 3))
        x = np.random.default_rng(2).uniform(0.0, 1.0, size=(len(TARGETS), SIZE, SIZE, 3)).astype(dtype)
        _PAIRS[name] = tv, (model, variables), x
    return _PAIRS[name]


def _nnx_twin(tv, dtype):
    kw = {"num_classes": CLASSES, "hidden_features": HIDDEN, "dtype": dtype, "param_dtype": dtype}
    model = nnx.eval_shape(lambda: jm.nnx.VGG(CFG, **kw, rngs=nnx.Rngs(0)))
    return jm.load_torchvision_nnx(model, tv.state_dict(), dtype=dtype)


class _FullHeatmap(CondAttribution or object):
    """zennit-crp's attribution with the input relevance per input channel (its default sums them)."""

    def heatmap_modifier(self, data, on_device=None):
        return data.grad.detach()


def _crp(tv, x, layers, exclude_parallel, record=()):
    """zennit-crp: condition set k conditions ``layer`` on ``channels[k]`` for every (layer, channels)
    in ``layers`` (upper layer first, as zennit-crp requires), for every sample; returned with jlrp's
    layout: heatmap (K, N, H, W, 3), relevances (K, N, H, W, C) or (K, N, F)."""
    k = len(layers[0][1])
    n = len(x)
    data = torch.tensor(np.repeat(np.transpose(x, (0, 3, 1, 2)), k, axis=0), requires_grad=True)
    conditions = [
        {**{layer: [channels[j]] for layer, channels in layers}, "y": [int(t)]}
        for t in TARGETS
        for j in range(k)
    ]
    result = _FullHeatmap(tv)(
        data, conditions, EpsilonPlusFlat(), record_layer=list(record), exclude_parallel=exclude_parallel
    )

    def layout(a):
        a = a.detach().numpy().reshape((n, k) + tuple(a.shape[1:])).swapaxes(0, 1)
        return np.moveaxis(a, 2, -1) if a.ndim == 5 else a

    return layout(result.heatmap), {name: layout(r) for name, r in result.relevances.items()}


def _jlrp(explained, args, x, layers, exclude_parallel, capture=()):
    points = concepts.tap_points(explained, *args, x, capture=[path for _, path, _ in layers])
    cc = concepts.ChannelConcept()
    conditions = {path: cc.masks(channels, points[path]) for _, path, channels in layers}
    return concepts.attribute(
        explained,
        *args,
        x,
        target=TARGETS,
        capture=list(capture) or None,
        conditions=conditions,
        exclude_parallel=exclude_parallel,
    )


def _assert_close(actual, expected, tol, what):
    scale = np.abs(expected).max()
    assert scale > 0, f"{what}: the reference is all zero"
    error = np.abs(np.asarray(actual) - expected).max() / scale
    assert error <= tol, f"{what}: max error {error:.2e} of the reference's max-abs (tolerance {tol:.0e})"


def _ones_or(masks, k, rows):
    """``(K, C)`` masks: ``masks`` at ``rows``, all ones (no condition) elsewhere."""
    out = np.ones((k, masks.shape[1]))
    out[rows] = masks
    return out


def _check_relevances(res, rows, relevances, conditioned, channels, exclude_parallel, what):
    """jlrp's relevances at the recorded layers for condition sets ``rows`` against zennit-crp's run
    that conditioned ``conditioned`` on ``channels``; and the channel relevances and top channels of
    both ChannelConcepts from them."""
    for torch_name, path in RECORD:
        expected = relevances[torch_name]
        actual = np.asarray(res.relevances[path])[rows]
        if path == conditioned:  # see the module docstring: zennit-crp's value at its conditioned layer
            masks = np.eye(actual.shape[-1])[channels][:, None, None, None, :]
            actual = actual * masks * (2.0 if exclude_parallel else 1.0)
        assert actual.shape == expected.shape, path
        _assert_close(actual, expected, 1e-10, f"{what}: relevance at {path}")
        channels_first = np.moveaxis(expected, -1, 2) if expected.ndim == 5 else expected
        reference = torch.tensor(channels_first.reshape((-1,) + channels_first.shape[2:]))
        for abs_norm in (False, True):
            want = CrpChannelConcept().attribute(reference, abs_norm=abs_norm).numpy()
            want = want.reshape(actual.shape[:2] + (-1,))
            got = concepts.ChannelConcept().attribute(actual, abs_norm=abs_norm, batch_axes=2)
            _assert_close(got, want, 1e-10, f"{what}: channel relevance at {path}, abs_norm={abs_norm}")
        top = concepts.ChannelConcept().top_k(actual, 3, batch_axes=2)[1]
        assert np.array_equal(np.asarray(top), np.argsort(-want, axis=-1, kind="stable")[..., :3]), path


@pytest.mark.parametrize("exclude_parallel", [True, False])
def test_conditional_heatmaps_and_relevances_match_crp(crp, exclude_parallel):
    """Conditional heatmaps for channels of the upper layer, of the lower layer, and of both at once
    equal zennit-crp's within 1e-10 of each heatmap's max-abs, and so do the relevances at the
    recorded layers (above, at and below the conditioned one), zennit-crp's
    ChannelConcept.attribute (with and without abs_norm) and the top channels (linen; NNX too with
    exclude_parallel).

    One jlrp call covers the three kinds: condition sets 0-3 condition the upper layer only (all-ones
    mask at the lower one, which then conditions nothing), 4-7 the lower layer only, 8-11 both;
    zennit-crp gets one call per kind."""
    tv, (model, variables), x = _pair(np.float64)
    (upper_t, upper, up), (lower_t, lower, low) = UPPER, LOWER
    record = [t for t, _ in RECORD]
    heat_up, rel_up = _crp(tv, x, [(upper_t, up)], exclude_parallel, record)
    heat_low, rel_low = _crp(tv, x, [(lower_t, low)], exclude_parallel, record)
    heat_both, _ = _crp(tv, x, [(upper_t, up), (lower_t, low)], exclude_parallel)
    expected = np.concatenate([heat_up, heat_low, heat_both])
    k = len(up)
    upper_masks = _ones_or(np.eye(32)[up + up], 3 * k, np.r_[0:k, 2 * k : 3 * k])
    conditions = {upper: upper_masks, lower: _ones_or(np.eye(16)[low + low], 3 * k, np.r_[k : 3 * k])}
    composite = composites.EpsilonPlusFlat()
    runs = {"linen": (jlrp.explain(model, composite), (variables,))}
    if exclude_parallel:
        runs["NNX"] = (jlrp.explain(_nnx_twin(tv, np.float64), composite), ())
    for front, (explained, args) in runs.items():
        res = concepts.attribute(
            explained,
            *args,
            x,
            target=TARGETS,
            capture=[p for _, p in RECORD],
            conditions=conditions,
            exclude_parallel=exclude_parallel,
        )
        assert res.heatmap.shape == expected.shape == (3 * k, len(TARGETS), SIZE, SIZE, 3)
        for j in range(expected.shape[0]):
            for n in range(expected.shape[1]):
                kind = ("upper", "lower", "both")[j // k]
                what = f"{front} {kind} condition {j % k} sample {n}"
                _assert_close(res.heatmap[j, n], expected[j, n], 1e-10, what)
        _check_relevances(res, np.s_[0:k], rel_up, upper, up, exclude_parallel, f"{front} upper")
        _check_relevances(res, np.s_[k : 2 * k], rel_low, lower, low, exclude_parallel, f"{front} lower")
    # the conditions select different parts of the heatmap: no two are alike
    flat = expected.reshape(expected.shape[0], -1)
    assert np.abs(flat[:, None] - flat[None]).max(-1)[~np.eye(len(flat), dtype=bool)].min() > 0


def test_float32_conditional_heatmaps_match_crp(crp):
    """float32 on both sides: the conditional heatmaps of both layers at once agree within 1e-5."""
    tv, (model, variables), x = _pair(np.float32)
    expected, _ = _crp(tv, x, [(UPPER[0], UPPER[2]), (LOWER[0], LOWER[2])], True)
    res = _jlrp(jlrp.explain(model, composites.EpsilonPlusFlat()), (variables,), x, [UPPER, LOWER], True)
    assert res.heatmap.dtype == jnp.float32
    for k in range(expected.shape[0]):
        for n in range(expected.shape[1]):
            _assert_close(res.heatmap[k, n], expected[k, n], 1e-5, f"float32 condition {k} sample {n}")
