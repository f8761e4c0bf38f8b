"""Suite-wide settings: one torch thread (tiny models run faster, and results are reproducible)."""

import torch

torch.set_num_threads(1)
