"""Parity with zennit itself: the same random weights in torch (zennit with its canonizers) and in jlrp.

Every named composite on VGG11-BN and ResNet18 (torchvision architectures, BatchNorm with random
statistics, reduced input size), float64 on both sides. The relevance maps must agree to 1e-4
relative to the map's max-abs. Also: relevance on the residual network is not doubled, and
``audit`` reports nothing uncovered on the zoo models.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import jlrp
import jlrp.models as jm
from jlrp import composites

torch = pytest.importorskip("torch")
torchvision = pytest.importorskip("torchvision")
zennit = pytest.importorskip("zennit")
from zennit import composites as zc  # noqa: E402
from zennit import torchvision as zt  # noqa: E402

pytestmark = pytest.mark.crosscheck

SIZE = 32
BATCH = 2
CLASSES = 10
TARGETS = np.array([3, 7])
LOW, HIGH = -3.0, 3.0


def _randomise_batchnorm(model, generator):
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, torch.nn.BatchNorm2d):
                n = module.num_features
                module.running_mean.copy_(0.2 * torch.randn(n, generator=generator, dtype=torch.float64))
                module.running_var.copy_(0.5 + torch.rand(n, generator=generator, dtype=torch.float64))
                module.weight.copy_(0.5 + torch.rand(n, generator=generator, dtype=torch.float64))
                module.bias.copy_(0.1 * torch.randn(n, generator=generator, dtype=torch.float64))
            elif isinstance(module, (torch.nn.Conv2d, torch.nn.Linear)) and module.bias is not None:
                module.bias.copy_(
                    0.05 * torch.randn(module.bias.shape, generator=generator, dtype=torch.float64)
                )


_PAIRS: dict[str, tuple] = {}


def _pair(arch):
    if arch not in _PAIRS:
        _PAIRS[arch] = _make_pair(arch)
    return _PAIRS[arch]


def _make_pair(arch):
    torch.manual_seed(0)
    tv = getattr(torchvision.models, arch)(weights=None, num_classes=CLASSES).double().eval()
    _randomise_batchnorm(tv, torch.Generator().manual_seed(1))
    for module in tv.modules():
        # zennit's ReLUBetaSmooth reads the ReLU's input after an in-place ReLU overwrote it,
        # giving sigmoid(beta * relu(x)) instead of its documented sigmoid(beta * x)
        if isinstance(module, torch.nn.ReLU):
            module.inplace = False
    variables = jm.from_torchvision(tv.state_dict(), arch, dtype=np.float64, input_shape=(1, SIZE, SIZE, 3))
    model = getattr(jm, arch)(num_classes=CLASSES, dtype=jnp.float64, param_dtype=jnp.float64)
    x = np.random.default_rng(2).uniform(LOW, HIGH, size=(BATCH, SIZE, SIZE, 3))
    canonizer = zt.VGGCanonizer if arch.startswith("vgg") else zt.ResNetCanonizer
    nnx_model = nnx.eval_shape(
        lambda: getattr(jm.nnx, arch)(
            num_classes=CLASSES, dtype=jnp.float64, param_dtype=jnp.float64, rngs=nnx.Rngs(0)
        )
    )
    jm.load_torchvision_nnx(nnx_model, tv.state_dict(), dtype=np.float64)
    return arch, tv, canonizer, (model, nnx_model), variables, x


ZENNIT = {
    "epsilon_gamma_box": lambda c: zc.EpsilonGammaBox(low=LOW, high=HIGH, canonizers=c),
    "epsilon_plus": lambda c: zc.EpsilonPlus(canonizers=c),
    "epsilon_alpha2_beta1": lambda c: zc.EpsilonAlpha2Beta1(canonizers=c),
    "epsilon_plus_flat": lambda c: zc.EpsilonPlusFlat(canonizers=c),
    "epsilon_alpha2_beta1_flat": lambda c: zc.EpsilonAlpha2Beta1Flat(canonizers=c),
    "guided_backprop": lambda c: zc.GuidedBackprop(canonizers=c),
    "deconvnet": lambda c: zc.DeconvNet(canonizers=c),
    "excitation_backprop": lambda c: zc.ExcitationBackprop(canonizers=c),
    "beta_smooth": lambda c: zc.BetaSmooth(canonizers=c),
}


def _zennit_relevance(tv, canonizer, name, x):
    inputs = torch.tensor(np.transpose(x, (0, 3, 1, 2)), dtype=torch.float64, requires_grad=True)
    composite = ZENNIT[name]([canonizer()])
    with composite.context(tv) as modified:
        output = modified(inputs)
        start = output * torch.nn.functional.one_hot(torch.tensor(TARGETS), CLASSES).double()
        (relevance,) = torch.autograd.grad(output, inputs, start)
    return output.detach().numpy(), np.transpose(relevance.numpy(), (0, 2, 3, 1))


def _jlrp_relevance(model, variables, name, x):
    composite = (
        composites.get(name, low=LOW, high=HIGH) if name == "epsilon_gamma_box" else composites.get(name)
    )
    explained = jlrp.explain(model, composite)
    if variables is None:  # NNX: called like the model
        output, pullback = jax.vjp(lambda v: explained(v), jnp.asarray(x))
    else:
        output, pullback = jax.vjp(lambda v: explained(variables, v), jnp.asarray(x))
    (relevance,) = pullback(output * jax.nn.one_hot(TARGETS, CLASSES, dtype=output.dtype))
    return np.asarray(output), np.asarray(relevance)


# zennit keeps one stored input per module, and torchvision's ResNet blocks call one ReLU module twice,
# so zennit's BetaSmooth (the only ReLU rule that reads the input) is wrong there; that case is checked
# against an independent surrogate-gradient reference below instead.
CASES = [
    (a, n) for a in ("vgg11_bn", "resnet18") for n in sorted(ZENNIT) if (a, n) != ("resnet18", "beta_smooth")
]


@pytest.mark.parametrize("arch, name", CASES)
def test_composite_matches_zennit(arch, name):
    """linen and NNX against zennit (1e-4 of the map's max-abs), and NNX against linen (1e-10)."""
    arch, tv, canonizer, (model, nnx_model), variables, x = _pair(arch)
    z_out, z_rel = _zennit_relevance(tv, canonizer, name, x)
    j_out, j_rel = _jlrp_relevance(model, variables, name, x)
    n_out, n_rel = _jlrp_relevance(nnx_model, None, name, x)
    np.testing.assert_allclose(j_out, z_out, rtol=1e-9, atol=1e-10)
    np.testing.assert_allclose(n_out, j_out, rtol=1e-12, atol=1e-12)
    for n in range(BATCH):
        scale = np.abs(z_rel[n]).max()
        assert scale > 0
        error = np.abs(j_rel[n] - z_rel[n]).max() / scale
        assert error <= 1e-4, f"{arch} {name} sample {n}: linen vs zennit max relative error {error:.2e}"
        error = np.abs(n_rel[n] - z_rel[n]).max() / scale
        assert error <= 1e-4, f"{arch} {name} sample {n}: NNX vs zennit max relative error {error:.2e}"
        error = np.abs(n_rel[n] - j_rel[n]).max() / np.abs(j_rel[n]).max()
        assert error <= 1e-10, f"{arch} {name} sample {n}: NNX vs linen max relative error {error:.2e}"


def test_beta_smooth_resnet_matches_surrogate_gradient(monkeypatch):
    """BetaSmooth = the gradient of the model whose ReLUs have the softplus gradient sigmoid(beta x)."""
    import flax.linen as nn

    arch, tv, canonizer, (model, _), variables, x = _pair("resnet18")
    _, j_rel = _jlrp_relevance(model, variables, "beta_smooth", x)

    @jax.custom_jvp
    def smooth_relu(a):
        return jnp.maximum(a, 0)

    smooth_relu.defjvp(
        lambda primals, tangents: (smooth_relu(primals[0]), jax.nn.sigmoid(10.0 * primals[0]) * tangents[0])
    )
    monkeypatch.setattr(nn, "relu", smooth_relu)
    output, pullback = jax.vjp(lambda v: model.apply(variables, v), jnp.asarray(x))
    (reference,) = pullback(output * jax.nn.one_hot(TARGETS, CLASSES, dtype=output.dtype))
    np.testing.assert_allclose(j_rel, reference, rtol=1e-7, atol=1e-9 * np.abs(reference).max())


def test_residual_relevance_is_not_doubled():
    """zennit#236 class of bug: with plain gradients a residual add doubles the relevance."""
    model = jm.resnet18(num_classes=CLASSES, dtype=jnp.float64, param_dtype=jnp.float64)
    x = jnp.asarray(np.random.default_rng(3).uniform(0, 1, size=(BATCH, SIZE, SIZE, 3)))
    variables = model.init(jax.random.PRNGKey(0), x)
    no_bias = jax.tree_util.tree_map_with_path(
        lambda p, a: (
            jnp.zeros_like(a) if "bias" in jax.tree_util.keystr(p) or "mean" in jax.tree_util.keystr(p) else a
        ),
        variables,
    )
    explained = jlrp.explain(model, composites.EpsilonPlus(epsilon=1e-12, stabilizer=1e-12))
    output, pullback = jax.vjp(lambda v: explained(no_bias, v), x)
    (relevance,) = pullback(output * jax.nn.one_hot(TARGETS, CLASSES, dtype=output.dtype))
    score = np.asarray(output)[np.arange(BATCH), TARGETS]
    np.testing.assert_allclose(np.asarray(relevance).sum((1, 2, 3)), score, rtol=1e-6)


@pytest.mark.parametrize("arch", ["vgg11_bn", "vgg16", "resnet18", "resnet50"])
def test_audit_reports_nothing_uncovered_on_zoo(arch):
    model = getattr(jm, arch)(num_classes=CLASSES)
    x = jnp.zeros((1, SIZE, SIZE, 3))
    variables = jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0), x))
    report = jlrp.audit(jlrp.explain(model, composites.EpsilonGammaBox(LOW, HIGH)), variables, x)
    assert report.uncovered == (), str(report)
    assert not report.notes, str(report)
