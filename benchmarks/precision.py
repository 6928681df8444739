"""Float32 vs float64 for jlrp, zennit and the plain gradients, with the benchmark's weights and input.

Separates the rules' correctness (float64 jlrp vs float64 zennit) from float32 rounding in each
backend (each framework's float32 result vs its own float64 result), for VGG16 at 224x224 with
EpsilonPlusFlat (see RESULTS.md, Run D). Needs the ``crosscheck`` extra (torch, zennit).

    python benchmarks/precision.py [--batch 1]
"""

from __future__ import annotations

import argparse
import copy
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import jax  # noqa: E402
import numpy as np  # noqa: E402

jax.config.update("jax_enable_x64", True)

import bench  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import torch  # noqa: E402
from zennit import composites as zc  # noqa: E402
from zennit import torchvision as zt  # noqa: E402

import jlrp  # noqa: E402


def rel(a: np.ndarray, b: np.ndarray) -> float:
    """Max over samples of max|a - b| / max|b|."""
    scale = np.abs(b).reshape(len(b), -1).max(1)
    return float((np.abs(a - b).reshape(len(b), -1).max(1) / scale).max())


def main() -> int:
    """Print the float32 and float64 differences."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=1, help="batch size (the benchmark's input for it)")
    args = parser.parse_args()
    tmodel, classes = bench._torch_models("vgg16", 224, 0)
    state = {k: v.detach().numpy().copy() for k, v in tmodel.state_dict().items()}
    x, labels = bench._inputs({"batch": args.batch, "size": 224, "seed": 0}, classes)
    model, variables = bench._jax_model("vgg16", 224, classes, state, 0)
    onehot = np.eye(classes)[labels]

    def torch_run(dtype: torch.dtype, lrp: bool) -> tuple[np.ndarray, np.ndarray]:
        net = copy.deepcopy(tmodel).to(dtype)
        if lrp:
            zc.EpsilonPlusFlat(canonizers=[zt.VGGCanonizer()]).register(net)
        inp = torch.from_numpy(np.ascontiguousarray(x.transpose(0, 3, 1, 2))).to(dtype).requires_grad_(True)
        out = net(inp)
        (grad,) = torch.autograd.grad(out, inp, (out * torch.from_numpy(onehot).to(dtype)).detach())
        return out.detach().double().numpy(), grad.double().numpy().transpose(0, 2, 3, 1)

    def jax_run(dtype: type, lrp: bool) -> tuple[np.ndarray, np.ndarray]:
        v = jax.tree_util.tree_map(lambda a: jnp.asarray(a, dtype), variables)
        apply = jlrp.explain(model, jlrp.composites.EpsilonPlusFlat()) if lrp else model.apply
        out, pull = jax.vjp(lambda a: apply(v, a), jnp.asarray(x, dtype))
        grad = pull(out * jnp.asarray(onehot, dtype))[0]
        return np.asarray(out, np.float64), np.asarray(grad, np.float64)

    print(f"VGG16 224x224, batch {args.batch}, relative to the second map's max-abs (max over samples)")
    print(
        "| quantity | JAX / jlrp: float32 vs float64 | torch / zennit: float32 vs float64 | float64: JAX vs torch |"
    )
    print("| --- | --- | --- | --- |")
    for name, lrp in (("logits", False), ("gradient", False), ("EpsilonPlusFlat relevance", True)):
        (jo32, jg32), (jo64, jg64) = jax_run(np.float32, lrp), jax_run(np.float64, lrp)
        (to32, tg32), (to64, tg64) = torch_run(torch.float32, lrp), torch_run(torch.float64, lrp)
        if name == "logits":
            row = (rel(jo32, jo64), rel(to32, to64), rel(jo64, to64))
        else:
            row = (rel(jg32, jg64), rel(tg32, tg64), rel(jg64, tg64))
        print(f"| {name} | {row[0]:.1e} | {row[1]:.1e} | {row[2]:.1e} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
