"""The ``jlrp`` command line (also ``python -m jlrp``).

- ``jlrp demo``: a pretrained EfficientNet-Lite0 explains scikit-image's photos (:mod:`jlrp.demos.photos`);
  ``jlrp demo digits``: a small CNN trained on scikit-learn's digits (:mod:`jlrp.demos.digits`).
- ``jlrp explain``: a zoo model or the user's own model on a folder of photos or an array::

      jlrp explain --model efficientnet_lite0 --inputs photos/ --overlay --out results/
      jlrp explain --model mypkg.models:make_net --variables ckpt/ --inputs photos/ --preprocess imagenet

- ``jlrp concepts``: reference samples of the channels of chosen layers (CRP) over a folder of photos::

      jlrp concepts --model efficientnet_lite0 --inputs photos/ --layers 'blocks_5*' --top-k 8 --out concepts/

Modules, by concept: :mod:`~jlrp.cli.parser` (arguments, entry point), :mod:`~jlrp.cli.explain` (the
explain command), :mod:`~jlrp.cli.models` (zoo, user models, variables: msgpack, npz, orbax, .pth),
:mod:`~jlrp.cli.images` (files and preprocessing, Pillow), :mod:`~jlrp.cli.outputs` (shards, heatmaps,
summary, resume), :mod:`~jlrp.cli.demo` (the demo commands), :mod:`~jlrp.cli.concepts` (the concepts
command), :mod:`~jlrp.cli.args` (:class:`CLIError`).

Mistakes in the arguments print one line ``jlrp <command>: error: ...`` with the fix on stderr and exit
with status 2; ``--debug`` shows the traceback instead.
"""

from jlrp._files import atomic_path

from .args import CLIError
from .parser import build_parser, main

__all__ = ["main", "CLIError", "atomic_path", "build_parser"]
