"""Demonstrations that run offline on a CPU, behind ``jlrp demo``: :mod:`jlrp.demos.photos`
(EfficientNet-Lite0 on scikit-image's photos, the default), :mod:`jlrp.demos.digits` (a small CNN
trained on scikit-learn's digits) and :mod:`jlrp.demos.text` (the similarity of sentence pairs
explained on the real all-MiniLM-L6-v2)."""
