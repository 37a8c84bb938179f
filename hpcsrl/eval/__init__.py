"""Few-label evaluation of pre-trained encoders on the split of `hpcsrl.data.splits`: linear
probe, fine-tune, floors; choices on validation, the test part scored once."""
