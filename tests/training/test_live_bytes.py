"""LiveBytes, the CPU's memory counter that the planner's activation model is checked against,
against sizes computed by hand."""

import torch

from megamoe.testing.live_bytes import LiveBytes

MB = 1000 * 1000 * 4  # a float32 [1000, 1000]


def test_counts_new_storages_once_and_subtracts_frees():
    a = torch.randn(1000, 1000, requires_grad=True)  # made before: never counted
    with LiveBytes() as live:
        b = a * 2
        c = b.sin()  # sin keeps its input b for backward
        view = c.view(-1)  # no new memory
        assert live.current == 2 * MB
        del b  # still saved by sin's backward
        assert live.current == 2 * MB
        c.sum().backward()  # a.grad appears; sin's saved b goes
        assert live.current == 2 * MB  # c and a.grad
        assert live.peak >= 3 * MB  # b, c and a gradient were alive together
        del c, view
        assert live.current == MB
        a.grad.add_(1)  # in place on an existing storage
        assert live.current == MB
        live.reset_peak()
        assert live.peak == MB
