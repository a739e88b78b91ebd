"""MixSKD (Yang et al., ECCV 2022) in JAX/Flax.

Importing this package has no side effects. The method lives in `losses`, `mixing`,
`objective` and `models`; see README.md for how they fit together.
"""

__version__ = "0.1.0"
