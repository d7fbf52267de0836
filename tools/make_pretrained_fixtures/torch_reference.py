"""Helpers of the fixture makers: random weights into a torch model, and its input images.

Never run by tests; imported by the make_*_fixture.py scripts beside it (torch needed).
"""

import numpy as np
import random_weights
import torch


def load_random_weights(model: torch.nn.Module, seed: int) -> list:
    """Give `model` the random weights its state dict's manifest describes (in eval mode);
    returns the manifest (tests/fixtures/random_weights.py rebuilds the arrays from it)."""
    state = model.state_dict()
    manifest = [random_weights.recipe(k, tuple(v.shape)) for k, v in state.items()]
    weights = random_weights.build(manifest, seed)
    model.load_state_dict({k: torch.from_numpy(v) for k, v in weights.items()})
    model.eval()
    return manifest


def input_images(seed: int, batch: int, size: int | tuple[int, int]) -> torch.Tensor:
    """The tests' input, N(0, 1) images [batch, rows, cols, 3] (a square for an int `size`)
    from `seed`, as torch's NCHW."""
    rows, cols = (size, size) if isinstance(size, int) else size
    images = np.random.RandomState(seed).standard_normal((batch, rows, cols, 3))
    return torch.from_numpy(images.astype(np.float32)).permute(0, 3, 1, 2)
