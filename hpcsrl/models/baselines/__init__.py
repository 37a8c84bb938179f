"""Baseline self-supervised methods (one file each), compared against Lite-SRL in Table 2."""
