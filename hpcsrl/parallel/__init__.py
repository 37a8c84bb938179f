"""Data-parallel training with Horovod: a `Distribution` for the shared epoch loop."""
