"""The `codi-jax` subcommands; each module defines its absl flags and a `main(argv)`."""
