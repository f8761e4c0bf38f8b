"""The Information Bottleneck loss of IB-INN generative classifiers (re-exported).

The loss lives next to the model, in :mod:`trustvision.models.mixture` (pure functions on
tensors, with the Gaussian-mixture density it is written on); this module keeps
``from trustvision.train.ib_loss import ib_loss`` working.
"""

from __future__ import annotations

from trustvision.models.mixture import IBLoss, ib_loss, ib_weights, perturb_inputs, smooth_labels

__all__ = ["IBLoss", "ib_loss", "ib_weights", "smooth_labels", "perturb_inputs"]
