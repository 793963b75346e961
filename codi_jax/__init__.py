"""codi-jax: CoDi (Any-to-Any Generation via Composable Diffusion) in JAX/Flax."""

__version__ = "0.1.0"
