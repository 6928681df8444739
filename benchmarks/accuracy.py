"""Accuracy report: every rule against its float64 reference, every composite against zennit.

Prints two small tables with the worst errors (the tests assert the bounds; this script shows the
actual numbers for the release notes):

    python benchmarks/accuracy.py            # rules only
    python benchmarks/accuracy.py --zennit   # + composites vs zennit on VGG11-BN / ResNet18 (linen, NNX)
"""

from __future__ import annotations

import argparse
import os
import sys

import jax

jax.config.update("jax_enable_x64", True)

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "tests"))

import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

import jlrp  # noqa: E402


def rule_errors() -> list[tuple[str, float]]:
    import test_rules as tr

    worst: dict[str, float] = {}
    for layer_name in tr.LAYERS:
        for bias in (True, False):
            for seed in (0, 1):
                layer, variables, x, kr = tr._layer_case(layer_name, bias, seed)
                W, b, z, W1 = tr._dense_view(layer, variables, x)
                R = jax.random.normal(kr, layer.apply(variables, x).shape, dtype=jnp.float64)
                for rule in tr.RULES:
                    explained = jlrp.explain(layer, {type(layer): rule})
                    (rel,) = jax.vjp(lambda v, e=explained, p=variables: e(p, v), x)[1](R)
                    expected = tr.reference(
                        rule, W, b, np.asarray(x[0]).ravel(), z, np.asarray(R[0]).ravel(), W1
                    )
                    err = np.abs(np.asarray(rel[0]).ravel() - expected).max() / max(
                        np.abs(expected).max(), 1e-300
                    )
                    worst[repr(rule)] = max(worst.get(repr(rule), 0.0), float(err))
    return sorted(worst.items())


def zennit_errors() -> list[tuple[str, str, float, float, float]]:
    import test_zennit_parity as tz

    rows = []
    for arch, name in tz.CASES:
        _, tv, canonizer, (model, nnx_model), variables, x = tz._pair(arch)
        _, z_rel = tz._zennit_relevance(tv, canonizer, name, x)
        _, j_rel = tz._jlrp_relevance(model, variables, name, x)
        _, n_rel = tz._jlrp_relevance(nnx_model, None, name, x)
        scale = np.abs(z_rel).reshape(len(x), -1).max(1)[:, None, None, None]
        rows.append(
            (
                arch,
                name,
                float((np.abs(j_rel - z_rel) / scale).max()),
                float((np.abs(n_rel - z_rel) / scale).max()),
                float((np.abs(n_rel - j_rel) / scale).max()),
            )
        )
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--zennit", action="store_true", help="also compare the composites with zennit")
    args = parser.parse_args()
    print(f"{'rule':<76}max rel. error vs float64 reference")
    for rule, err in rule_errors():
        print(f"{rule:<76}{err:.1e}")
    if args.zennit:
        print()
        print("model     composite                  linen vs zennit  NNX vs zennit  NNX vs linen")
        for arch, name, jl, nz, nl in zennit_errors():
            print(f"{arch:<10}{name:<27}{jl:<17.1e}{nz:<15.1e}{nl:.1e}")


if __name__ == "__main__":
    main()
