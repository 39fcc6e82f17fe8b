"""moa_flex.runtime.traceable: the changes that let Dynamo trace a model's forward keep its results."""

from __future__ import annotations

import torch

from moa_flex.runtime.traceable import mark_buffers, unmark_buffers


class _Reassigns(torch.nn.Module):
    """CTRL's pattern: a forward that assigns its nn.Buffer again (a no-op ``.to``)."""

    def __init__(self) -> None:
        super().__init__()
        self.kept = torch.nn.Buffer(torch.randn(8, 4))
        self.table = torch.nn.Buffer(torch.randn(8, 4), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.table = self.table.to(device=x.device, dtype=x.dtype)
        self.kept = self.kept.to(dtype=x.dtype)
        return x + self.table[: x.shape[0]] * self.kept[: x.shape[0]]


def test_unmarked_buffers_trace_as_one_graph_and_stay_registered_as_before() -> None:
    torch._dynamo.reset()
    m, x = _Reassigns(), torch.randn(5, 4)
    want, keys = m(x), set(m.state_dict())
    taken = unmark_buffers(m)
    assert len(taken) == 2
    got = torch.compile(m, backend="eager", fullgraph=True)(x)  # raises with the markers on
    assert torch.equal(got, want)
    assert set(m.state_dict()) == keys == {"kept"}, "reassigning kept each buffer's persistence"
    assert set(dict(m.named_buffers())) == {"kept", "table"}
    mark_buffers(taken)
    assert isinstance(m.table, torch.nn.Buffer) and m.table.persistent is False and m.kept.persistent is True

