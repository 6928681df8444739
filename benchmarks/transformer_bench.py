"""Transformer benchmark: AttnLRP / CP-LRP against a plain gradient, in one run on one machine.

Models:

- ``minilm``: the real all-MiniLM-L6-v2 (``jlrp.models.load_minilm``), the cosine similarity of
  sentence pairs, batch 8 pairs x 128 tokens (real sentences, padded to 128);
- ``vit``: a ViT-B/16-shaped ``jlrp.models.linen.ViT`` (12 layers, 768 wide, 224 x 224) with random
  weights, batch 8 (``--vit-batch``).

Methods: ``gradient`` (a jitted ``jax.vjp`` of the plain model; for MiniLM at the word-embedding
output, where jlrp reads token relevance, through ``flax.linen.intercept_methods``), ``AttnLRP`` and
``CPLRP`` (``jlrp.attribute``, jit-compiled by jlrp). Every method is called once (compilation), then
the methods are timed round-robin ``--repeats`` times; the table gives the median and the ratio to the
gradient. ``--lxt`` also times lxt 2.1 (AttnLRP, CP-LRP) and the torch gradient on the same sentences
in subprocesses (``benchmarks/lxt_time.py``; ``--lxt-device cuda`` on a GPU).

Precision: the same models in bfloat16 (parameters and computation), bias-free (biases, position
embeddings and class token zeroed): ``sum(R) / score`` under CP-LRP should stay within 1e-2 of 1.

    python benchmarks/transformer_bench.py                 # MiniLM + ViT-B/16, float32 and bfloat16
    python benchmarks/transformer_bench.py --quick         # small ViT, batch 2, 32 tokens: a smoke run
    python benchmarks/transformer_bench.py --lxt           # + lxt and torch on MiniLM
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

import jlrp
import jlrp.models as jm
from jlrp import composites

ROOT = Path(__file__).resolve().parents[1]
SENTENCES = [
    ("A man is eating food.", "A man is eating a piece of bread."),
    ("The cat sits on the mat.", "A dog is playing in the garden."),
    ("A woman is playing the violin.", "A woman plays a string instrument on stage."),
    ("The stock market fell sharply today.", "Shares dropped steeply in today's trading."),
    ("He is riding a horse along the beach.", "A person rides a horse by the sea."),
    ("The new phone has a great camera.", "Heavy rain is expected tomorrow morning."),
    ("Children are building a sandcastle.", "Kids make a castle out of sand at the beach."),
    ("She wrote a long letter to her friend.", "The train arrives at noon."),
]


def _time(fns: dict, repeats: int) -> dict[str, tuple[float, float]]:
    """Median seconds per call and first-call seconds, methods timed round-robin."""
    first, times = {}, {name: [] for name in fns}
    for name, fn in fns.items():
        start = time.perf_counter()
        jax.block_until_ready(fn())
        first[name] = time.perf_counter() - start
    for _ in range(repeats):
        for name, fn in fns.items():
            start = time.perf_counter()
            jax.block_until_ready(fn())
            times[name].append(time.perf_counter() - start)
    return {name: (statistics.median(times[name]), first[name]) for name in fns}


def _word_embedding_gradient(model, variables, ids, mask):
    """The plain gradient at the word-embedding output (where jlrp reads token relevance), jitted."""

    def forward(delta):
        def add_delta(next_fun, args, kwargs, context):
            out = next_fun(*args, **kwargs)
            module = context.module
            if (
                isinstance(module, nn.Embed)
                and module.name == "word_embeddings"
                and context.method_name == "__call__"
            ):
                out = out + delta
            return out

        with nn.intercept_methods(add_delta):
            return model.apply(variables, ids, mask)

    table = variables["params"]["bert"]["embeddings"]["word_embeddings"]["embedding"]
    delta = jnp.zeros(ids.shape + table.shape[-1:], table.dtype)

    @jax.jit
    def gradient(delta):
        y, vjp = jax.vjp(forward, delta)
        return vjp(y)[0].sum(-1)  # per-token sum, like jlrp's readout

    return lambda: gradient(delta)


def _bias_free(variables):
    def zero(path, a):
        key = jax.tree_util.keystr(path)
        return (
            jnp.zeros_like(a)
            if any(k in key for k in ("bias", "position_embeddings", "cls", "token_type"))
            else a
        )

    return jax.tree_util.tree_map_with_path(zero, variables)


def _minilm_case(dtype, pairs, args) -> dict:
    m = jm.load_minilm(head="similarity", dtype=dtype)
    ids, mask = m.encode(pairs, max_length=args.tokens, padding="max_length")
    ids, mask = jnp.asarray(ids), jnp.asarray(mask)
    fns = {"gradient": _word_embedding_gradient(m.model, m.variables, ids, mask)}
    for comp in (composites.AttnLRP(), composites.CPLRP()):
        explained = jlrp.explain(m.model, comp)
        fns[type(comp).__name__] = lambda e=explained: jlrp.attribute(e, m.variables, ids, mask, target=1.0)
    timed = _time(fns, args.repeats)
    cp = jlrp.explain(m.model, composites.CPLRP())
    score, rel = jlrp.attribute(cp, _bias_free(m.variables), ids, mask, target=1.0)
    ratio = np.asarray(rel, np.float32).reshape(len(ids), -1).sum(1) / np.asarray(score, np.float32)
    return dict(model="MiniLM similarity", shape=f"{len(pairs)} x 2 x {args.tokens} tokens",
                dtype=jnp.dtype(dtype).name, timed=timed, cp_conservation=float(np.abs(ratio - 1).max()),
                cp_conservation_median=float(np.median(np.abs(ratio - 1))))  # fmt: skip


def _pairs(args) -> list[tuple[str, str]]:
    return (SENTENCES * ((args.batch + len(SENTENCES) - 1) // len(SENTENCES)))[: args.batch]


def minilm(args) -> list[dict]:
    return [_minilm_case(dtype, _pairs(args), args) for dtype in (jnp.float32, jnp.bfloat16)]


def _vit_case(dtype, config, args) -> dict:
    model = jm.linen.ViT(config, dtype=dtype, param_dtype=dtype)
    shape = (args.vit_batch, config.image_size, config.image_size, 3)
    x = jax.random.normal(jax.random.PRNGKey(0), shape).astype(dtype)
    variables = jax.jit(model.init)(jax.random.PRNGKey(1), x)
    target = jax.nn.one_hot(3, config.num_labels, dtype=dtype)

    @jax.jit
    def gradient(v, a):
        y, vjp = jax.vjp(lambda b: model.apply(v, b), a)
        return vjp(y * target)[0]

    fns = {"gradient": lambda: gradient(variables, x)}
    for comp in (composites.AttnLRP(), composites.CPLRP()):
        explained = jlrp.explain(model, comp)
        fns[type(comp).__name__] = lambda e=explained: jlrp.attribute(e, variables, x, target=3)
    timed = _time(fns, args.repeats)
    score, rel = jlrp.attribute(jlrp.explain(model, composites.CPLRP()), _bias_free(variables), x, target=3)
    ratio = np.asarray(rel, np.float32).reshape(len(x), -1).sum(1) / np.asarray(score[:, 3], np.float32)
    size = f"{args.vit_batch} x {config.image_size}^2, {config.num_hidden_layers} x {config.hidden_size}"
    return dict(model="ViT-B/16-shaped" if not args.quick else "ViT (small)", shape=size,
                dtype=jnp.dtype(dtype).name, timed=timed, cp_conservation=float(np.abs(ratio - 1).max()),
                cp_conservation_median=float(np.median(np.abs(ratio - 1))))  # fmt: skip


def vit(args) -> list[dict]:
    config = jm.ViTConfig() if not args.quick else jm.ViTConfig(hidden_size=64, num_hidden_layers=2,
                                                               num_attention_heads=4, intermediate_size=128,
                                                               image_size=32, patch_size=8)  # fmt: skip
    return [_vit_case(dtype, config, args) for dtype in (jnp.float32, jnp.bfloat16)]


def lxt_rows(args) -> list[dict]:
    """lxt 2.1 and torch (``benchmarks/lxt_time.py``) on the token ids of :func:`minilm`."""
    import tempfile

    script = ROOT / "benchmarks" / "lxt_time.py"
    ids, mask = jm.load_minilm(head="similarity").encode(
        _pairs(args), max_length=args.tokens, padding="max_length"
    )
    with tempfile.TemporaryDirectory() as tmp:
        inputs = os.path.join(tmp, "inputs.npz")
        np.savez(inputs, ids=ids, mask=mask)
        cmd = [sys.executable, str(script), "--inputs", inputs, "--repeats", str(args.repeats),
               "--device", args.lxt_device, "--json"]  # fmt: skip
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=3600, check=True).stdout
    return [json.loads(out.strip().splitlines()[-1])]


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--quick", action="store_true", help="small ViT, batch 2, 32 tokens")
    parser.add_argument("--batch", type=int, default=8, help="sentence pairs per batch (MiniLM)")
    parser.add_argument("--tokens", type=int, default=128, help="tokens per sentence (padded)")
    parser.add_argument("--vit-batch", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--models", nargs="+", default=["minilm", "vit"], choices=["minilm", "vit"])
    parser.add_argument("--lxt", action="store_true", help="also time lxt 2.1 and torch (MiniLM)")
    parser.add_argument("--lxt-device", default="cpu", help="torch device for --lxt (cpu, cuda)")
    parser.add_argument("--json", type=Path, help="write the rows here")
    args = parser.parse_args(argv)
    if args.quick:
        args.batch, args.tokens, args.vit_batch, args.repeats = 2, 32, 2, 2
    print(f"# {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, jax {jax.__version__}, "
          f"backend {jax.default_backend()}, {' '.join(sys.argv)}")  # fmt: skip
    rows = []
    if "minilm" in args.models:
        rows += minilm(args)
    if "vit" in args.models:
        rows += vit(args)
    print(
        f"{'model':<20} {'input':<28} {'dtype':<9} {'method':<9} {'s/batch':>9} {'x grad':>7} {'first s':>8}"
    )
    for row in rows:
        grad = row["timed"]["gradient"][0]
        for method, (median, first) in row["timed"].items():
            print(f"{row['model']:<20} {row['shape']:<28} {row['dtype']:<9} {method:<9} {median:9.3f} "
                  f"{median / grad:7.2f} {first:8.1f}")  # fmt: skip
        print(
            f"{'':<20} {'':<28} {row['dtype']:<9} bias-free CP-LRP |sum(R)/score - 1|: "
            f"max {row['cp_conservation']:.1e}, median {row['cp_conservation_median']:.1e}"
        )
    if args.lxt:
        for row in lxt_rows(args):
            print("lxt:", json.dumps(row))
            rows.append(row)
    if args.json:
        args.json.write_text(json.dumps(rows, indent=1, default=str))


if __name__ == "__main__":
    main()
