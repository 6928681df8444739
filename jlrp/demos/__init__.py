"""The demos behind ``jlrp demo``: :mod:`jlrp.demos.photos` (EfficientNet-Lite0 on scikit-image's photos,
the default) and :mod:`jlrp.demos.digits` (a small CNN trained on scikit-learn's digits)."""
