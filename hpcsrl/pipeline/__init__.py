"""DHP: hybrid data/model-parallel training over MPI ranks (stages, transport, chains, runtime)."""
