"""Shared test set-up: float64 is enabled so references can be compared at 1e-10 and below.

Tests that check float32/bfloat16 behaviour pass explicitly typed arrays.
"""

import jax

jax.config.update("jax_enable_x64", True)
