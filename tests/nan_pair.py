"""A pair whose quantized model returns NaN: for the CLI's non-finite test."""

import torch

from qdrift_stats import testbed


def nan_pair():
    pair = testbed.mixture_vp_noise()
    pair.q = lambda sample, timestep, **cond: torch.full_like(sample, float("nan"))
    return pair
