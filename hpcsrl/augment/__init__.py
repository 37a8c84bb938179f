"""Batched two-view augmentations on (N, C, H, W) tensors; the sensor decides the pipeline."""

from hpcsrl.augment.views import ViewTransform, make_view_transform, two_views

__all__ = ["ViewTransform", "make_view_transform", "two_views"]
