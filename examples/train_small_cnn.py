"""A small CNN classifier on synthetic images, for ``fisherlab train --model``.

    fisherlab train --model examples/train_small_cnn.py:small_cnn --optimizer deflation --out runs/cnn

The images are noise with one of three patterns added (a horizontal bar, a vertical bar, a
diagonal), the class being the pattern; the data are generated here, seeded, so the file
stands alone.
"""

import torch
from torch import nn
from torch.utils.data import TensorDataset

SIZE = 12
CLASSES = 3


def _images(count: int, generator: torch.Generator) -> TensorDataset:
    labels = torch.randint(CLASSES, (count,), generator=generator)
    patterns = torch.zeros(CLASSES, SIZE, SIZE)
    patterns[0, SIZE // 2] = 1.0
    patterns[1, :, SIZE // 2] = 1.0
    patterns[2] = torch.eye(SIZE)
    images = patterns[labels] + 0.5 * torch.randn(count, SIZE, SIZE, generator=generator)
    return TensorDataset(images[:, None], labels)


def small_cnn():
    """``(model, train_set, validation_set, likelihood)``: a Conv2d → pool → Conv2d → Linear
    classifier (its output the logits) and 256 + 64 labelled 12 × 12 images."""
    generator = torch.Generator().manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(1, 4, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),  # 4 × 6 × 6
        nn.Conv2d(4, 6, 3, stride=2, padding=1), nn.ReLU(),  # 6 × 3 × 3
        nn.Flatten(), nn.Linear(54, 16), nn.ReLU(), nn.Linear(16, CLASSES),
    )
    return model, _images(256, generator), _images(64, generator), "categorical"
