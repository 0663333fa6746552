"""A small CNN on synthetic images, for ``fisherlab record|study --model examples/small_cnn.py:build``.

The data are generated here (no download): 12 × 12 single-channel images of Gaussian noise,
labelled by which of three fixed random filters they match best, so the classes are learnable.
"""

import torch
from torch import nn


def build():
    """``(model, train_set, validation_set, likelihood)`` as ``fisherlab --model`` takes them."""
    gen = torch.Generator().manual_seed(0)
    images = torch.randn(640, 1, 12, 12, generator=gen)
    filters = torch.randn(3, 144, generator=gen)
    labels = (images.flatten(1) @ filters.T).argmax(1)
    model = nn.Sequential(
        nn.Conv2d(1, 4, 3), nn.ReLU(), nn.MaxPool2d(2),  # 12 → 10 → 5
        nn.Conv2d(4, 8, 3, bias=False), nn.ReLU(),  # 5 → 3
        nn.Flatten(), nn.Linear(72, 3),
    )
    pairs = list(zip(images, labels))
    return model, pairs[:512], pairs[512:], "categorical"
