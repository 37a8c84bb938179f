"""CWB partition planning: profile + cluster -> exact plan (pure Python: no torch, no MPI)."""
