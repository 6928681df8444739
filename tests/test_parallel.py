"""Memory-bounded and multi-device attribution: ``jlrp.attribute(..., batch_size=..., devices=...)``.

The chunked path must give the unchunked relevance (every sample is explained on its own; kernels for
another batch size may only round differently, so float64 results agree to ~1e-15). The sharded path
runs in a subprocess with four simulated CPU devices (``XLA_FLAGS`` must be set before JAX starts):
its output is really sharded over the four devices, each device's shard is bit-for-bit a plain call on
that shard, and the whole equals the single-device result, also when the batch needs padding.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import jlrp
from jlrp import composites

ROOT = Path(__file__).resolve().parents[1]
N, H, W, C, CLASSES = 7, 8, 8, 3, 5


class SmallCNN(nn.Module):
    """Conv-ReLU-Conv-ReLU, max-pool, flatten, Dense: first-layer, conv and dense rules all in play."""

    @nn.compact
    def __call__(self, x):
        x = nn.relu(nn.Conv(4, (3, 3), padding=1)(x))
        x = nn.relu(nn.Conv(6, (3, 3), padding=1)(x))
        x = nn.max_pool(x, (2, 2), strides=(2, 2))
        return nn.Dense(CLASSES)(x.reshape(x.shape[0], -1))


def rel_err(a, b) -> float:
    a, b = np.asarray(a), np.asarray(b)
    return float(np.max(np.abs(a - b)) / max(np.max(np.abs(b)), 1e-300))


@pytest.fixture(scope="module")
def setup():
    model = SmallCNN()
    x = jnp.asarray(np.random.default_rng(0).uniform(-3, 3, (N, H, W, C)))
    variables = jax.jit(model.init)(jax.random.PRNGKey(0), x[:1])
    explained = jlrp.explain(model, composites.EpsilonGammaBox(-3.0, 3.0))
    return explained, variables, x


TARGETS = {
    "argmax": None,
    "per-sample ints": np.arange(N) % CLASSES,
    "per-sample mask": np.random.default_rng(1).uniform(0, 1, (N, CLASSES)),
    "broadcast mask": np.eye(CLASSES)[3][None],
    "callable": lambda out: out * (out > 0),
}


CHUNKED_CASES = [("per-sample ints", b) for b in (1, 3, 100)] + [
    (t, 3) for t in TARGETS if t != "per-sample ints"
]


@pytest.mark.parametrize("target, batch_size", CHUNKED_CASES)
def test_chunked_equals_unchunked(setup, target, batch_size):
    explained, variables, x = setup
    out, rel = jlrp.attribute(explained, variables, x, target=TARGETS[target])
    out_c, rel_c = jlrp.attribute(explained, variables, x, target=TARGETS[target], batch_size=batch_size)
    assert rel_c.shape == rel.shape and rel_c.dtype == rel.dtype
    assert out_c.shape == out.shape
    assert rel_err(rel_c, rel) < 1e-12
    assert rel_err(out_c, out) < 1e-12


def test_chunked_nnx():
    class Model(nnx.Module):
        def __init__(self, rngs):
            self.conv = nnx.Conv(C, 4, (3, 3), rngs=rngs)
            self.dense = nnx.Linear(H * W * 4, CLASSES, rngs=rngs)

        def __call__(self, x):
            return self.dense(nnx.relu(self.conv(x)).reshape(x.shape[0], -1))

    explained = jlrp.explain(Model(nnx.Rngs(0)), composites.EpsilonPlusFlat())
    x = jnp.asarray(np.random.default_rng(2).uniform(-1, 1, (5, H, W, C)))
    _, rel = jlrp.attribute(explained, x, target=np.arange(5) % CLASSES)
    _, rel_c = jlrp.attribute(explained, x, target=np.arange(5) % CLASSES, batch_size=2)
    assert rel_err(rel_c, rel) < 1e-12


def test_chunked_does_not_recompile(setup):
    explained, variables, x = setup
    jlrp.attribute(explained, variables, x, target=1, batch_size=3)
    size = jlrp.attribution._attribute._cache_size()
    jlrp.attribute(explained, variables, x + 1.0, target=2, batch_size=3)
    assert jlrp.attribution._attribute._cache_size() == size


def test_bad_options(setup):
    explained, variables, x = setup
    with pytest.raises(ValueError, match="batch_size"):
        jlrp.attribute(explained, variables, x, batch_size=0)
    with pytest.raises(ValueError, match="local device"):
        jlrp.attribute(explained, variables, x, devices=len(jax.local_devices()) + 1)
    with pytest.raises(TypeError, match="jax.Device"):
        jlrp.attribute(explained, variables, x, devices=["cpu"])

    class Summed(nn.Module):
        @nn.compact
        def __call__(self, x):
            return nn.Dense(CLASSES)(x.reshape(x.shape[0], -1)).sum(0)

    summed = jlrp.explain(Summed(), composites.EpsilonPlus())
    v = Summed().init(jax.random.PRNGKey(0), x)
    with pytest.raises(ValueError, match="batch axis first"):
        jlrp.attribute(summed, v, x, target=0, batch_size=2)


def test_single_device_mesh(setup):
    explained, variables, x = setup
    _, rel = jlrp.attribute(explained, variables, x, target=1)
    out_s, rel_s = jlrp.attribute(explained, variables, x, target=1, devices=jax.local_devices()[:1])
    assert rel_err(rel_s, rel) < 1e-12
    assert rel_s.sharding.mesh.devices.size == 1


SHARDED_SCRIPT = textwrap.dedent(
    """
    import jax
    jax.config.update("jax_enable_x64", True)
    assert jax.local_device_count() == 4, jax.devices()
    import numpy as np, jax.numpy as jnp
    import flax.linen as nn
    from jax.sharding import NamedSharding, PartitionSpec
    import jlrp
    from jlrp import composites

    class SmallCNN(nn.Module):
        @nn.compact
        def __call__(self, x):
            x = nn.relu(nn.Conv(4, (3, 3), padding=1)(x))
            x = nn.relu(nn.Conv(6, (3, 3), padding=1)(x))
            x = nn.max_pool(x, (2, 2), strides=(2, 2))
            return nn.Dense(5)(x.reshape(x.shape[0], -1))

    def rel_err(a, b):
        a, b = np.asarray(a), np.asarray(b)
        return float(np.abs(a - b).max() / np.abs(b).max())

    model = SmallCNN()
    x = jnp.asarray(np.random.default_rng(0).uniform(-3, 3, (8, 8, 8, 3)))
    variables = jax.jit(model.init)(jax.random.PRNGKey(0), x[:1])
    explained = jlrp.explain(model, composites.EpsilonGammaBox(-3.0, 3.0))
    labels = np.arange(8) % 5

    out, rel = jlrp.attribute(explained, variables, x, target=labels)
    out_s, rel_s = jlrp.attribute(explained, variables, x, target=labels, devices=4)
    for a in (out_s, rel_s):
        assert isinstance(a.sharding, NamedSharding), a.sharding
        assert a.sharding.spec == PartitionSpec(jlrp.attribution.BATCH_AXIS), a.sharding.spec
        assert set(a.sharding.device_set) == set(jax.local_devices())
        shards = sorted(a.addressable_shards, key=lambda s: s.index[0].start)
        assert len(shards) == 4 and len({s.device for s in shards}) == 4
        assert all(s.data.shape[0] == 2 for s in shards)
    assert rel_err(rel_s, rel) < 1e-12 and rel_err(out_s, out) < 1e-12
    # each device's shard is exactly a plain single-device call on that shard
    for s in rel_s.addressable_shards:
        i = s.index[0].start
        _, part = jlrp.attribute(explained, variables, x[i : i + 2], target=labels[i : i + 2])
        assert np.array_equal(np.asarray(s.data), np.asarray(part)), i

    # padding: 7 samples on 4 (or 3) devices, also chunked on every device; per-sample mask, callable
    mask = np.random.default_rng(1).uniform(0, 1, (7, 5))
    cases = [
        (labels[:7], {"devices": 4}),
        (labels[:7], {"devices": jax.local_devices()[1:], "batch_size": 2}),
        (mask, {"devices": 4, "batch_size": 1}),
        (lambda o: o * (o > 0), {"devices": 4}),
    ]
    for target, kw in cases:
        _, ref = jlrp.attribute(explained, variables, x[:7], target=target)
        o, r = jlrp.attribute(explained, variables, x[:7], target=target, **kw)
        assert r.shape == ref.shape and o.shape == (7, 5), (r.shape, o.shape)
        assert rel_err(r, ref) < 1e-12, (kw, rel_err(r, ref))
    print("SHARDED-OK")
    """
)


def test_sharded_over_four_cpu_devices():
    env = dict(os.environ)
    env["XLA_FLAGS"] = (env.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=4").strip()
    env["JAX_PLATFORMS"] = "cpu"
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT), env.get("PYTHONPATH", "")) if p)
    result = subprocess.run(
        [sys.executable, "-c", SHARDED_SCRIPT],
        env=env,
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0 and "SHARDED-OK" in result.stdout, result.stdout + result.stderr
