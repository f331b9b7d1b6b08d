"""Shared test set-up: one torch thread (two threads on these 2-core machines run tiny models 30-150x slower)."""

import torch

torch.set_num_threads(1)
torch.manual_seed(0)
