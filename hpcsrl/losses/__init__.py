"""Self-supervised losses as pure functions of embeddings (no modules, no state)."""

from hpcsrl.losses.byol import byol_loss
from hpcsrl.losses.cosine import lite_srl_loss, negative_cosine, simsiam_loss
from hpcsrl.losses.infonce import moco_infonce
from hpcsrl.losses.ntxent import nt_xent

__all__ = ["byol_loss", "lite_srl_loss", "moco_infonce", "negative_cosine", "nt_xent",
           "simsiam_loss"]
