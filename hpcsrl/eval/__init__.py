"""Few-label evaluation of pre-trained encoders: splits, linear probe, fine-tune, floors."""
