"""Backbones, heads and self-supervised methods, each exposed as a chain of partitionable units.

Build models through `hpcsrl.models.registry.build_method`; the unit contract is in `units.py`.
"""
