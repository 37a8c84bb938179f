"""Parallel preprocessing: Sentinel scenes (GDAL) to HDF5 patches across MPI ranks."""
