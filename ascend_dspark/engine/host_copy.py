"""The one device -> host copy per step (engine.py reads it; the runner's steps produce it)."""

from __future__ import annotations

import torch

from ascend_dspark.platform import Platform


class HostCopy:
    """The one device -> host copy per step: every tensor the step produced, in one int64
    tensor, copied without waiting (into pinned memory on an accelerator), with an event to
    wait for. float32 tensors travel bit-cast to int32 (exact, no float64, which NPUs lack);
    the host casts the bits back."""

    def __init__(self, parts: dict[str, torch.Tensor], platform: Platform) -> None:
        self.layout = [(name, t.shape, t.is_floating_point()) for name, t in parts.items()]
        flat = [(t.float().contiguous().view(torch.int32) if t.is_floating_point() else t).long().reshape(-1)
                for t in parts.values()]
        self.host = torch.cat(flat).to("cpu", non_blocking=True) if flat else None
        self.event = platform.event()
        self.event.record()

    def receive(self) -> dict[str, list]:
        """Wait for the copy; each tensor as nested lists."""
        self.event.synchronize()
        flat = self.host.tolist() if self.host is not None else []
        out, i = {}, 0
        for name, shape, is_float in self.layout:
            n = shape.numel()
            values = torch.tensor(flat[i: i + n], dtype=torch.long).view(shape)
            i += n
            out[name] = (values.to(torch.int32).view(torch.float32) if is_float else values).tolist()
        return out
