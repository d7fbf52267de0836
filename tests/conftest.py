"""Session-wide test settings: the shared compilation cache and the fast-compiling XLA level
(tests/jax_env.py)."""

import jax_env

jax_env.enable()
