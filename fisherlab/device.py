"""Which device a command runs on: one resolver and one default for every command.

The default is the CPU everywhere: a run's numbers depend on the device, and a command
given the same arguments should give the same numbers on every machine. ``auto`` picks
CUDA where it is available.
"""

from __future__ import annotations

import torch

from fisherlab.errors import UserInputError

#: The default of every command's ``--device``.
DEFAULT_DEVICE = "cpu"
#: The help text of every command's ``--device``.
DEVICE_HELP = "cpu (default), cuda, cuda:N, or auto (cuda where available, else cpu)"


def resolve_device(spec: str | torch.device = DEFAULT_DEVICE) -> torch.device:
    """The device ``spec`` names: ``cpu``, ``cuda``, ``cuda:N`` or ``auto``.

    Raises:
        UserInputError: for another name, or a CUDA device that is not available.
    """
    if isinstance(spec, torch.device):
        spec = str(spec)
    text = str(spec).strip().lower()
    if text == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if text != "cpu" and text != "cuda" and not (text.startswith("cuda:") and text[5:].isdigit()):
        raise UserInputError(f"unknown device {spec!r}; use cpu, cuda, cuda:N or auto")
    device = torch.device(text)
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise UserInputError(f"device {spec} requested but no CUDA device is available")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise UserInputError(f"device {spec} requested but there are {torch.cuda.device_count()} CUDA devices")
    return device
