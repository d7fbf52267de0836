"""Session-wide test settings: the shared compilation cache (tests/jax_cache.py)."""

import jax_cache

jax_cache.enable()
