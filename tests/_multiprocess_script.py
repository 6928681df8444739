"""One of the two JAX processes of ``tests/test_multiprocess.py``: ``python _multiprocess_script.py K PORT``.

Two processes with two CPU devices each join through ``jax.distributed`` (coordinator on 127.0.0.1,
CPU collectives by gloo) into one 2x2 mesh ('data' across the processes, 'model' across each
process's two devices). A small CNN with its Dense kernels split over 'model' (``nn.with_partitioning``)
explains a batch of 8 of which every process feeds its own 4 samples: through
``jlrp.attribute(..., mesh=mesh)`` (process-local inputs, annotated host parameters) and through the
attributors on global arrays. Each result's rows of this process are compared with a plain
single-device run of the whole batch in the same process (no mesh, no collectives); every comparison
prints one ``RESULT {json}`` line.
"""

from __future__ import annotations

import json
import sys
import time

import jax

PROCESS, PORT = int(sys.argv[1]), sys.argv[2]
jax.config.update("jax_cpu_collectives_implementation", "gloo")
jax.distributed.initialize(
    coordinator_address=f"127.0.0.1:{PORT}", num_processes=2, process_id=PROCESS, initialization_timeout=60
)

import flax.linen as nn  # noqa: E402
import numpy as np  # noqa: E402
from jax.experimental import multihost_utils  # noqa: E402
from jax.sharding import AxisType, NamedSharding  # noqa: E402
from jax.sharding import PartitionSpec as P  # noqa: E402

import jlrp  # noqa: E402
from jlrp import attribution, composites  # noqa: E402

T0 = time.perf_counter()
assert jax.process_count() == 2 and jax.device_count() == 4 and jax.local_device_count() == 2
MESH = jax.make_mesh((2, 2), ("data", "model"), axis_types=(AxisType.Auto, AxisType.Auto))
assert {d.process_index for d in MESH.devices[PROCESS]} == {PROCESS}, MESH.devices  # row k: process k
N, LOCAL = 8, slice(4 * PROCESS, 4 * PROCESS + 4)


class Net(nn.Module):
    @nn.compact
    def __call__(self, x):
        x = nn.relu(nn.Conv(4, (3, 3))(x))
        x = x.reshape(x.shape[0], -1)
        split = nn.with_partitioning(nn.initializers.lecun_normal(), (None, "model"))
        x = nn.relu(nn.Dense(16, kernel_init=split)(x))
        rows = nn.with_partitioning(nn.initializers.lecun_normal(), ("model", None))
        return nn.Dense(5, kernel_init=rows)(x)


def report(**fields):
    print("RESULT " + json.dumps(fields), flush=True)


def rel_err(a, b):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.abs(a - b).max() / np.abs(b).max())


def local_rows(a):
    """This process's rows of a global array sharded over 'data'."""
    return np.asarray(multihost_utils.global_array_to_host_local_array(a, MESH, P("data")))


rng = np.random.default_rng(0)  # the same numbers in both processes: the whole batch, then its parts
X = rng.uniform(-1, 1, (N, 6, 6, 3)).astype(np.float32)
LABELS = (np.arange(N) % 5).astype(np.int32)
model = Net()
boxed = jax.jit(model.init)(jax.random.key(0), X[:1])  # host-side values, nn.Partitioned boxes
host = jax.device_get(nn.unbox(boxed))
explained = jlrp.explain(model, composites.EpsilonGammaBox(-1.0, 1.0))

# jlrp.attribute: each process passes its own samples, the parameters as annotated host arrays
out0, rel0 = jlrp.attribute(explained, host, X, target=LABELS)
out, rel = jlrp.attribute(explained, boxed, X[LOCAL], target=LABELS[LOCAL], mesh=MESH)
report(
    case="attribute", shape=list(rel.shape), spec=str(rel.sharding.spec), rel=rel_err(local_rows(rel), rel0[LOCAL]),
    out=rel_err(local_rows(out), out0[LOCAL]),
)  # fmt: skip

# the attributors on global arrays: every process builds the global batch from its part
spmd = attribution._Spmd(MESH, ("data",))
specs = nn.get_partition_spec(boxed)
params = jax.tree.map(
    lambda a, s: jax.make_array_from_callback(a.shape, NamedSharding(MESH, s), lambda i: a[i]),
    host,
    specs,
)
x = jax.make_array_from_process_local_data(spmd.sharding(), X[LOCAL])
labels = jax.make_array_from_process_local_data(spmd.sharding(), LABELS[LOCAL])
attributors = {
    "Gradient": attribution.Gradient(explained),
    "SmoothGrad": attribution.SmoothGrad(explained, noise_level=0.1, n_iter=3, chunk_size=2),
    "IntegratedGradients": attribution.IntegratedGradients(explained, n_iter=3),
}
for name, attributor in attributors.items():
    _, expected = attributor(host, X, target=LABELS)
    _, got = attributor(params, x, target=labels)
    report(case=name, shape=list(got.shape), rel=rel_err(local_rows(got), expected[LOCAL]))

# a local batch that does not split over this process's two positions along a 1-D mesh: one clear error
line = jax.make_mesh((4,), ("data",), axis_types=(AxisType.Auto,))
try:
    jlrp.attribute(explained, host, X[:3], target=LABELS[:3], mesh=line)
    report(case="uneven", error=None)
except ValueError as err:
    report(case="uneven", error=str(err))

report(case="total", seconds=round(time.perf_counter() - T0, 1))
