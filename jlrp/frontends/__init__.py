"""Front-end machinery shared by the linen and NNX adapters (:mod:`jlrp.frontends.base`).

The adapters themselves stay at :mod:`jlrp.linen` and :mod:`jlrp.nnx` (public names
``LinenExplained``, ``NNXExplained``, ``explain_nnx``); each is only its interception mechanism.
"""
