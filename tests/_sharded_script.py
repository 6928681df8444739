"""The cases of ``tests/test_sharded.py``, run in one subprocess with 8 simulated CPU devices.

A 2x4 mesh ('data', 'model'); parameters split over 'model' as Flax's partitioning annotations declare
them (Megatron-style: the first Dense of a pair and convolutions over their output features, the second
over its input); the batch over 'data'. Each case prints one ``RESULT {json}`` line that the test reads:
the relevance's largest difference to the single-device result relative to its largest magnitude, the
relevance's sharding and, from the compiled HLO, every all-gather whose result is as large as a split
parameter (the full weight gathered). Run it by hand with
``XLA_FLAGS=--xla_force_host_platform_device_count=8 python tests/_sharded_script.py [case ...]``.
"""

from __future__ import annotations

import json
import re
import sys
import time

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx, traverse_util
from jax.sharding import AxisType, NamedSharding
from jax.sharding import PartitionSpec as P

import jlrp
import jlrp.models as jm
from jlrp import composites

assert jax.device_count() == 8, jax.devices()
T0 = time.perf_counter()
MESH = jax.make_mesh((2, 4), ("data", "model"), axis_types=(AxisType.Auto, AxisType.Auto))
BERT = jm.BertConfig(
    vocab_size=50, hidden_size=16, num_hidden_layers=1, num_attention_heads=4,
    intermediate_size=32, max_position_embeddings=12,
)  # fmt: skip
VIT = jm.ViTConfig(
    hidden_size=16, num_hidden_layers=1, num_attention_heads=4, intermediate_size=32,
    image_size=8, patch_size=4, num_labels=8,
)  # fmt: skip
RNG = np.random.default_rng(0)
IDS = RNG.integers(1, 50, (4, 6)).astype(np.int32)
MASK = np.ones((4, 6), np.int32)
MASK[1, 4:] = 0
IMAGES = RNG.normal(size=(4, 8, 8, 3)).astype(np.float32)
PHOTOS = RNG.normal(size=(4, 8, 8, 3)).astype(np.float32)


_CPU = [time.process_time()]


def report(**fields):
    now = time.process_time()
    fields["cpu"] = round(now - _CPU[0], 1)
    _CPU[0] = now
    print("RESULT " + json.dumps(fields), flush=True)


def names_for(path, shape):
    """Megatron-style tensor parallelism over 'model': kernels split over their output features
    (q/k/v: the heads), the second Dense of a pair (attention out, MLP output) over its input."""
    if path[-1] != "kernel":
        return None
    if len(shape) == 3:  # DenseGeneral: q/k/v (H, heads, d), out (heads, d, H)
        return ("model", None, None) if path[-2] == "out" else (None, "model", None)
    if len(shape) == 2 and path[-2] == "output":
        return ("model", None)
    if shape[-1] % 4 == 0:
        return (None,) * (len(shape) - 1) + ("model",)
    return None


def random_value(rng, path, s):
    """Kernels ~ N(0, 1/fan_in), norm scales ~ 1, running variances in [0.5, 1.5], the rest ~ N(0, 0.1^2)."""
    if path[-1] == "kernel":
        return rng.normal(0, 1 / np.sqrt(np.prod(s.shape[:-1])), s.shape).astype(s.dtype)
    if path[-1] == "var":
        return rng.uniform(0.5, 1.5, s.shape).astype(s.dtype)
    return rng.normal(1.0 if path[-1] == "scale" else 0.0, 0.1, s.shape).astype(s.dtype)


def random_variables(model, *inputs, seed=0):
    """linen variables with random values from NumPy (an XLA init of a ResNet compiles for seconds)."""
    rng = np.random.default_rng(seed)
    shapes = traverse_util.flatten_dict(jax.eval_shape(model.init, jax.random.key(0), *inputs))
    return traverse_util.unflatten_dict({p: random_value(rng, p, s) for p, s in shapes.items()})


def random_nnx(make, seed=0, annotate=False):
    """An NNX model with random NumPy values; ``annotate``: kernels get ``out_sharding`` metadata, as
    ``nnx.with_partitioning`` declares it (the arrays stay on the host)."""
    rng = np.random.default_rng(seed)
    model = nnx.eval_shape(make)
    for path, node in nnx.iter_graph(model):
        if isinstance(node, nnx.Param):
            path = tuple(map(str, path))
            node.set_value(random_value(rng, path, node.get_value()))
            if annotate and (names := names_for(path, node.get_value().shape)):
                node.set_metadata(out_sharding=names)
    return model


def boxed(variables):
    """linen variables as nn.with_partitioning makes them (nn.Partitioned boxes)."""
    flat = traverse_util.flatten_dict(variables)
    return traverse_util.unflatten_dict(
        {k: nn.Partitioned(v, names=n) if (n := names_for(k, v.shape)) else v for k, v in flat.items()}
    )


def placed(variables):
    """Boxed variables placed by their annotations, the linen idiom (nn.get_partition_spec)."""
    specs = nn.get_partition_spec(variables)
    return jax.device_put(variables, jax.tree.map(lambda s: NamedSharding(MESH, s), specs))


def all_gather_sizes(hlo):
    """Element counts of the results of every all-gather in compiled HLO text."""
    sizes = []
    for line in hlo.splitlines():
        m = "all-gather" in line and re.search(r"= (.*?) all-gather(?:-start)?\(", line)
        if m:
            for dims in re.findall(r"\w+\[([\d,]*)\]", m.group(1)):
                sizes.append(int(np.prod([int(d) for d in dims.split(",") if d])))
    return sizes


def sharded_sizes(params):
    """Element counts of the (full) parameters that are split over the mesh."""
    return {
        a.size
        for a in jax.tree.leaves(params)
        if isinstance(a, jax.Array) and not a.sharding.is_fully_replicated
    }


def rel_err(a, b):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.abs(a - b).max() / np.abs(b).max())


def compiled_case(name, explained, host_args, sharded_args, **kw):
    """Single-device relevance vs the same call with mesh=, compiled once under jax.jit (its HLO read)."""
    t0 = time.perf_counter()
    out0, rel0 = jlrp.attribute(explained, *host_args, **kw)
    params, x, *rest = sharded_args
    call = jax.jit(lambda p, x: jlrp.attribute(explained, p, x, *rest, mesh=MESH, **kw))
    compiled = call.lower(params, x).compile()
    out1, rel1 = compiled(params, x)
    gathers = all_gather_sizes(compiled.as_text())
    report(
        case=name, rel=rel_err(rel1, rel0), out=rel_err(out1, out0), spec=str(rel1.sharding.spec),
        sharded_params=len([a for a in jax.tree.leaves(params) if not a.sharding.is_fully_replicated]),
        all_gathers=len(gathers), full_param_gathers=sorted(set(gathers) & sharded_sizes(params)),
        seconds=round(time.perf_counter() - t0, 1),
    )  # fmt: skip
    return rel0, rel1


which = sys.argv[1:] or ["control", "vit", "bert", "nnx", "resnet", "jit", "errors"]

if "control" in which:  # the HLO check can fail: gathering a split kernel is seen
    k = jax.device_put(jnp.ones((16, 32)), NamedSharding(MESH, P(None, "model")))
    text = jax.jit(lambda a: a * 2, out_shardings=NamedSharding(MESH, P())).lower(k).compile().as_text()
    report(case="control", full_param_gathers=sorted(set(all_gather_sizes(text)) & sharded_sizes(k)))

if "vit" in which:  # linen ViT, nn.with_partitioning-style boxes placed by the user, AttnLRP
    model = jm.linen.ViT(VIT)
    host = random_variables(model, IMAGES)
    ex = jlrp.explain(model, composites.AttnLRP())
    compiled_case(
        "vit-linen-AttnLRP", ex, (host, IMAGES), (placed(boxed(host)), IMAGES), target=np.arange(4) % 8
    )

if "bert" in which:  # linen BERT (token ids; mask replicated), CP-LRP
    model = jm.linen.Bert(BERT)
    host = random_variables(model, IDS, MASK)
    ex = jlrp.explain(model, composites.CPLRP())
    sharded = placed(boxed(host))
    compiled_case(
        "bert-linen-CPLRP", ex, (host, IDS, MASK), (sharded, IDS, MASK), target=np.arange(4) % 16, output=1
    )

if "nnx" in which:  # NNX BERT with annotated host kernels: attribute(mesh=) places them itself; AttnLRP
    t0 = time.perf_counter()
    make = lambda: jm.nnx.Bert(BERT, rngs=nnx.Rngs(0))  # noqa: E731
    ex0 = jlrp.explain(random_nnx(make), composites.AttnLRP())
    ex1 = jlrp.explain(random_nnx(make, annotate=True), composites.AttnLRP())
    state = jlrp.attribution._placed_params(ex1.state, jlrp.attribution._Spmd(MESH, ("data",)), False, "")
    specs = {
        jax.tree_util.keystr(p): str(a.sharding.spec)
        for p, a in jax.tree_util.tree_leaves_with_path(state)
        if not a.sharding.is_fully_replicated
    }
    out0, rel0 = jlrp.attribute(ex0, IDS, MASK, target=np.arange(4) % 16, output=1)
    out1, rel1 = jlrp.attribute(ex1, IDS, MASK, target=np.arange(4) % 16, output=1, mesh=MESH)
    report(
        case="bert-nnx-AttnLRP", rel=rel_err(rel1, rel0), out=rel_err(out1, out0), spec=str(rel1.sharding.spec),
        placed_specs=specs, seconds=round(time.perf_counter() - t0, 1),
    )  # fmt: skip

if "resnet" in which:  # linen ResNet, conv kernels split over output channels
    model = jm.linen.ResNet(jm.linen.BasicBlock, (1, 1, 1, 1), num_classes=8)
    host = random_variables(model, PHOTOS)
    ex = jlrp.explain(model, composites.EpsilonPlusFlat())
    rel0, rel1 = compiled_case(
        "resnet-linen-EpsilonPlusFlat", ex, (host, PHOTOS), (placed(boxed(host)), PHOTOS), target=3
    )
    resnet = (ex, host, rel0, rel1)

if "jit" in which:  # shardings named inside the model survive the explained trace; chunked batch per device
    act = NamedSharding(MESH, P("data", None))  # a spec of its own: seen only if the jit survives
    residual = jax.jit(lambda a, b: a + b, out_shardings=act)

    class Block(nn.Module):
        constrain: bool = True  # False: the same maths without sharding annotations (the reference)

        @nn.compact
        def __call__(self, x):
            h = nn.Dense(
                16, kernel_init=nn.with_partitioning(nn.initializers.lecun_normal(), (None, "model"))
            )(x)
            if self.constrain:
                h = jax.lax.with_sharding_constraint(h, P("data", "model"))
            h = nn.relu((residual if self.constrain else jnp.add)(h, nn.Dense(16)(h)))
            return nn.Dense(
                4, kernel_init=nn.with_partitioning(nn.initializers.lecun_normal(), ("model", None))
            )(h)

    def shardings(jaxpr, found):
        for eqn in jaxpr.eqns:
            if eqn.primitive.name == "sharding_constraint":
                found.add(str(eqn.params["sharding"].spec))
            if eqn.primitive.name in ("pjit", "jit"):
                found.update(str(s.spec) for s in eqn.params["out_shardings"] if hasattr(s, "spec"))
            for sub in jax.extend.core.jaxprs_in_params(eqn.params):
                shardings(sub, found)
        return found

    model = Block()
    x = RNG.normal(size=(8, 12)).astype(np.float32)
    with jax.set_mesh(MESH):
        variables = placed(model.init(jax.random.key(4), x))
        ex = jlrp.explain(model, composites.EpsilonPlus())
        in_model = shardings(jax.make_jaxpr(model.apply)(variables, x).jaxpr, set())
        in_explained = shardings(jax.make_jaxpr(ex)(variables, x).jaxpr, set())
    # no mesh in context: attribute(mesh=) sets it for the model's own PartitionSpec constraint
    _, rel = jlrp.attribute(ex, variables, x, target=1, mesh=MESH)
    _, chunked = jlrp.attribute(ex, variables, x, target=1, mesh=MESH, batch_size=2)
    plain = jlrp.explain(Block(constrain=False), composites.EpsilonPlus())
    _, rel0 = jlrp.attribute(plain, jax.device_get(nn.unbox(variables)), x, target=1)
    report(
        case="jit-shardings", in_model=sorted(in_model), missing=sorted(in_model - in_explained),
        rel=rel_err(rel, rel0), chunked=rel_err(chunked, rel0), chunked_spec=str(chunked.sharding.spec),
    )  # fmt: skip

if "resnet" in which and rel_err(resnet[3], resnet[2]) > 1e-6:  # last: float64 from here on
    # beyond 1e-6: is it float32 rounding? the single-device float32 result's own distance to float64
    jax.config.update("jax_enable_x64", True)
    ex, host, rel0, rel1 = resnet
    host64 = jax.tree.map(lambda a: np.asarray(a, np.float64), host)
    _, truth = jlrp.attribute(ex, host64, PHOTOS.astype(np.float64), target=3)
    report(case="resnet-float32-vs-float64", single=rel_err(rel0, truth), sharded=rel_err(rel1, truth))

if "errors" in which:  # a parameter split over other devices than the mesh's is refused, not gathered
    half = jax.make_mesh((4,), ("model",), devices=jax.devices()[:4], axis_types=(AxisType.Auto,))
    model = nn.Dense(4)
    variables = {
        "params": {
            "kernel": jax.device_put(np.ones((3, 4), np.float32), NamedSharding(half, P(None, "model"))),
            "bias": np.zeros(4, np.float32),
        }
    }
    try:
        jlrp.attribute(
            jlrp.explain(model, composites.EpsilonPlus()), variables, np.ones((2, 3), np.float32), mesh=MESH
        )
        report(case="errors", other_devices=None)
    except ValueError as err:
        report(case="errors", other_devices=str(err))

report(case="total", seconds=round(time.perf_counter() - T0, 1))
