"""Training losses shared by tasks (pure functions; models live in psvae_jax.models)."""
