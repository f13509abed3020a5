"""HostStaging: the graph runner's inputs go to the device through page-locked buffers,
and a buffer is refilled only after the copies out of it have run."""

from __future__ import annotations

import torch

from ascend_dspark.engine.graph_runner import HostStaging


class RecordingPlatform:
    """A platform double: counts pinned allocations and records event use in order."""

    def __init__(self) -> None:
        self.log: list[str] = []
        self.pinned: list[int] = []

    def pinned_empty(self, size, dtype):
        self.pinned.append(size)
        return torch.full((size,), -1, dtype=dtype)

    def event(self):
        platform = self

        class Event:
            def record(self):
                platform.log.append("record")

            def synchronize(self):
                platform.log.append("wait")
        return Event()


def test_uploads_copy_through_reused_buffers_after_the_last_copy_ran():
    platform = RecordingPlatform()
    staging = HostStaging(platform)
    dst = [torch.zeros(4, dtype=torch.long), torch.zeros(4, dtype=torch.bool), torch.zeros(4)]
    staging.upload([(dst[0], torch.tensor([3, 1, 4, 1])), (dst[1], torch.tensor([True, False, True, True])),
                    (dst[2], torch.tensor([0.5, 1.0, 2.0, 0.25]))])
    assert dst[0].tolist() == [3, 1, 4, 1] and dst[1].tolist() == [True, False, True, True]
    assert dst[2].tolist() == [0.5, 1.0, 2.0, 0.25]
    assert platform.log == ["record"] and platform.pinned == [4, 4, 4]
    staging.upload([(dst[0][:2], torch.tensor([7, 8])), (dst[1][:2], torch.tensor([False, False])),
                    (dst[2][:2], torch.tensor([9.0, 9.5]))])
    assert platform.log == ["record", "wait", "record"]          # waited before refilling
    assert platform.pinned == [4, 4, 4]                            # no new buffers
    assert dst[0].tolist() == [7, 8, 4, 1] and dst[2].tolist() == [9.0, 9.5, 2.0, 0.25]
    staging.upload([(torch.zeros(6, dtype=torch.long), torch.arange(6))])
    assert platform.pinned == [4, 4, 4, 6]                         # a larger batch: a larger buffer
