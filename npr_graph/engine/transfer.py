"""Moving the engine's small tensors between host and device without making either wait.

A blocking copy to a GPU waits for all work queued before it, and reading a value on the host
waits for the work that makes it: in an overlapped decode step (``Engine(overlap=True)``) either
would hold the host until the forward it just queued has run. Host tensors go to the device
through pinned memory (torch keeps a pinned block until the copy out of it has run), and values
come back through pinned memory and an event, read only when the host needs them.
"""

from __future__ import annotations

import torch


def to_device(tensor: torch.Tensor, device: torch.device) -> torch.Tensor:
    """A small host tensor on ``device``, without waiting for the device (through pinned
    memory to a GPU)."""
    if tensor.device.type != "cpu" or torch.device(device).type != "cuda":
        return tensor.to(device)
    return tensor.pin_memory().to(device, non_blocking=True)


def copy_into(buffer: torch.Tensor, source: torch.Tensor) -> None:
    """Copy ``source`` into ``buffer`` (a fixed buffer, e.g. a CUDA graph's input) without
    waiting: from the host through pinned memory, from the device in stream order."""
    if source.device.type == "cpu" and buffer.device.type == "cuda":
        source = source.pin_memory()
    buffer.copy_(source, non_blocking=True)


class HostCopy:
    """Tensors on their way to the host. On a GPU the copy is queued behind the work that makes
    them (into pinned memory, with an event), so the host can queue more work before it waits
    for them: the engine's overlapped steps launch the next forward first."""

    def __init__(self, *tensors: torch.Tensor) -> None:
        self.event = None
        if tensors and tensors[0].device.type == "cuda":
            pinned = [torch.empty(t.shape, dtype=t.dtype, pin_memory=True) for t in tensors]
            for host, tensor in zip(pinned, tensors, strict=True):
                host.copy_(tensor, non_blocking=True)
            self.event = torch.cuda.Event()
            self.event.record()
            tensors = tuple(pinned)
        self.tensors = tensors

    def tolist(self) -> list[list]:
        if self.event is not None:
            self.event.synchronize()
        return [t.tolist() for t in self.tensors]
