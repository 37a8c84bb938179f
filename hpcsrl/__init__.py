"""hpcsrl: MPI/Horovod toolkit for self-supervised learning on Sentinel-1/-2 imagery."""
__version__ = "0.1.0"
