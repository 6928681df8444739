"""Evaluation metrics for attributions: region perturbation (pixel flipping), token deletion, conservation,
a random baseline.

Everything here is jit-compiled and batched over samples (axis 0). Memory stays bounded: the perturbation
steps are evaluated one chunk at a time under :func:`jax.lax.map`, and ``batch_size`` splits the samples
into chunks of one compiled size. One module per concept:

- :mod:`~jlrp.metrics.perturbation`: :func:`region_perturbation` (and :func:`pixel_flipping`, its
  ``patch_size=1`` case): Bach et al. (2015), "On pixel-wise explanations for non-linear classifier
  decisions by layer-wise relevance propagation"; Samek et al. (2017), "Evaluating the visualization of
  what a deep neural network has learned". Regions of ``patch_size x patch_size`` pixels are ranked by
  their summed relevance and replaced by a baseline, most relevant first (MoRF) or least relevant first
  (LeRF); the score of the target class is recorded after every step, and its area under the curve (AUC)
  and the area over the perturbation curve (AOPC) summarise it per sample.
- :mod:`~jlrp.metrics.tokens`: :func:`token_deletion` and :func:`token_faithfulness`, the same for token
  ids (deleted by a replacement id or from the attention mask; special tokens never), with the area
  between the LeRF and MoRF curves the AttnLRP authors report (Achtibat et al. 2024).
- :mod:`~jlrp.metrics.conservation`: :func:`conservation`, LRP's completeness property,
  :math:`\\sum_i R_i = f_c(x)`, checked per sample.
- :mod:`~jlrp.metrics.baselines`: :func:`random_attribution`, seeded random relevance, the baseline every
  method should beat (for pixels and for tokens alike).

Example::

    fn = model.apply                                    # fn(params, x) -> logits
    _, rel = jlrp.attribute(jlrp.explain(model, 'epsilon_plus_flat'), variables, x)
    morf = metrics.region_perturbation(fn, x, rel, params=variables, order='morf', patch_size=2)
    lerf = metrics.region_perturbation(fn, x, rel, params=variables, order='lerf', patch_size=2)
    rand = metrics.region_perturbation(fn, x, metrics.random_attribution(x, seed=0), params=variables)
    print(morf.auc.mean(), lerf.auc.mean(), morf.aopc.mean(), rand.auc.mean())
"""

from __future__ import annotations

from ._common import step_counts
from .baselines import random_attribution
from .conservation import ConservationResult, conservation
from .perturbation import PerturbationResult, pixel_flipping, region_ids, region_perturbation
from .tokens import TokenDeletionResult, TokenFaithfulness, token_deletion, token_faithfulness

__all__ = [
    "PerturbationResult",
    "ConservationResult",
    "TokenDeletionResult",
    "TokenFaithfulness",
    "region_perturbation",
    "pixel_flipping",
    "token_deletion",
    "token_faithfulness",
    "conservation",
    "random_attribution",
    "region_ids",
    "step_counts",
]
