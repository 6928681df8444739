"""Parity with zennit on EfficientNet-Lite0: depthwise convolutions, ReLU6, skip adds, BatchNorm merging.

The pretrained weights in float64 on both sides: jlrp's linen model, and zennit's composites with
``SequentialMergeBatchNorm`` on the torch twin of ``tests/_effnet_twin.py``. Every composite that
puts a rule on this model must give the same relevance to 1e-6 of the map's max-abs.

The input is 23x23 (CI time): the stem then pads symmetrically, so the twin can pad it inside
``Conv2d`` as jlrp's Flax convolution does (zennit's first-layer ZBox and Flat rules would
otherwise see ``F.pad``'s zeros as input), while the stride-2 depthwise convolutions inside the
network still pad asymmetrically (12 -> 6 and 6 -> 3 pixels: (0, 1) and (1, 2)).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jlrp
import jlrp.models as jm
from jlrp import composites
from jlrp.errors import CompositeError

torch = pytest.importorskip("torch")
pytest.importorskip("zennit")
from _effnet_twin import TorchEfficientNetLite0  # noqa: E402
from test_zennit_parity import HIGH, LOW, ZENNIT  # noqa: E402  (the composite mapping of the VGG/ResNet parity)
from zennit import composites as zc  # noqa: E402
from zennit.canonizers import SequentialMergeBatchNorm  # noqa: E402
from zennit.rules import Pass  # noqa: E402
from zennit.types import Activation  # noqa: E402

pytestmark = pytest.mark.crosscheck

SIZE = 23
TOLERANCE = 1e-6
# ReLU6 is no ReLU: zennit's and jlrp's GuidedBackprop, DeconvNet and BetaSmooth act on ReLUs only,
# so on EfficientNet-Lite they change nothing (zennit silently returns the gradient; jlrp raises).
NO_RULE_HERE = ("guided_backprop", "deconvnet", "beta_smooth")
# EpsilonPlus and EpsilonAlpha2Beta1Flat put no rule on EfficientNet's layer kinds that EpsilonPlusFlat
# and EpsilonAlpha2Beta1 do not (they differ in the first layer only); all four run on VGG and ResNet
# in test_zennit_parity.
CASES = sorted(set(ZENNIT) - set(NO_RULE_HERE) - {"epsilon_plus", "epsilon_alpha2_beta1_flat"})
# zennit's ExcitationBackprop, unlike its other composites, maps no rule to activations, so a ReLU6
# gets its gradient (zero where saturated, x > 6); jlrp's gives every activation Pass (as zennit's
# other composites do). Both agree on ReLU networks; here zennit is given the Pass entry.
ZENNIT_HERE = dict(
    ZENNIT,
    excitation_backprop=lambda c: zc.ExcitationBackprop(layer_map=[(Activation, Pass())], canonizers=c),
)


@pytest.fixture(scope="module")
def setup():
    state_dict = jm.read_pth(jm.efficientnet_lite0_weights())
    twin = TorchEfficientNetLite0(symmetric_stem=True).double().eval()
    twin.load_state_dict({k: torch.from_numpy(v.astype(np.float64)) for k, v in state_dict.items()})
    model, variables = jm.load_efficientnet_lite0(dtype=jnp.float64)
    x = np.random.default_rng(2).uniform(-1.0, 1.0, size=(1, SIZE, SIZE, 3))
    with torch.no_grad():
        logits = twin(torch.from_numpy(x.transpose(0, 3, 1, 2).copy())).numpy()
    return twin, model, variables, x, logits.argmax(-1)


def _zennit(twin, name, x, targets):
    inputs = torch.tensor(x.transpose(0, 3, 1, 2), requires_grad=True)
    canonizer = SequentialMergeBatchNorm()
    composite = ZENNIT_HERE[name]([canonizer])
    with composite.context(twin) as modified:
        output = modified(inputs)
        start = output * torch.nn.functional.one_hot(torch.tensor(targets), output.shape[-1]).double()
        (relevance,) = torch.autograd.grad(output, inputs, start)
    return output.detach().numpy(), relevance.numpy().transpose(0, 2, 3, 1)


def _jlrp(model, variables, name, x, targets):
    composite = (
        composites.get(name, low=LOW, high=HIGH) if name == "epsilon_gamma_box" else composites.get(name)
    )
    explained = jlrp.explain(model, composite)
    call = (lambda a: explained(a)) if variables is None else (lambda a: explained(variables, a))

    @jax.jit
    def relevance(x):
        output, pullback = jax.vjp(call, x)
        return output, pullback(output * jax.nn.one_hot(targets, output.shape[-1], dtype=output.dtype))[0]

    output, result = relevance(jnp.asarray(x))
    return np.asarray(output), np.asarray(result)


def test_twin_merges_every_batchnorm(setup):
    twin = setup[0]
    merged = SequentialMergeBatchNorm().apply(twin)
    assert len(merged) == sum(isinstance(m, torch.nn.BatchNorm2d) for m in twin.modules()) == 49


@pytest.mark.parametrize("name", CASES)
def test_composite_matches_zennit(setup, name):
    twin, model, variables, x, targets = setup
    z_out, z_rel = _zennit(twin, name, x, targets)
    j_out, j_rel = _jlrp(model, variables, name, x, targets)
    np.testing.assert_allclose(j_out, z_out, rtol=1e-9, atol=1e-10)
    scale = np.abs(z_rel).max()
    assert scale > 0
    error = np.abs(j_rel - z_rel).max() / scale
    print(f"EfficientNet-Lite0 {name}: jlrp vs zennit {error:.2e} of the map's max-abs")
    assert error <= TOLERANCE, f"EfficientNet-Lite0 {name}: max error {error:.2e} of the map's max-abs"


def test_nnx_matches_zennit(setup):
    twin, _, _, x, targets = setup
    nnx_model, _ = jm.load_efficientnet_lite0("nnx", dtype=jnp.float64)
    _, z_rel = _zennit(twin, "epsilon_plus_flat", x, targets)
    _, n_rel = _jlrp(nnx_model, None, "epsilon_plus_flat", x, targets)
    assert np.abs(n_rel - z_rel).max() <= TOLERANCE * np.abs(z_rel).max()


@pytest.mark.parametrize("name", NO_RULE_HERE)
def test_relu_only_composites_refuse_a_relu6_network(setup, name):
    _, model, variables, x, _ = setup
    with pytest.raises(CompositeError, match="puts no rule on any layer"):
        jax.eval_shape(jlrp.explain(model, composites.get(name)), variables, jnp.asarray(x))
