"""moa_flex.runtime.traceable: the changes that let Dynamo trace a model's forward keep its results."""

from __future__ import annotations

import pytest
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



def test_dbrx_experts_through_the_op_equal_the_model_and_trace_as_one_graph() -> None:
    """The op runs transformers' own DbrxExperts.forward: the same numbers, bit for bit, on
    random routing (some experts hit by no token); the routed module traces fullgraph, which
    its own loop over ``nonzero()`` does not; unrouting gives the module its forward back."""
    from moa_flex.runtime.traceable import route_dbrx_experts, unroute_dbrx_experts
    from moa_flex.support import _build

    torch.manual_seed(0)
    model = _build("dbrx")
    ffn = model.transformer.blocks[0].ffn
    hidden = torch.randn(2, 7, model.config.d_model)
    with torch.no_grad():
        for p in ffn.parameters():
            p.normal_()
        weights, index = ffn.route_tokens_to_experts(ffn.router(hidden))
        index[:, 0] = 1  # experts 0 and 3 may see nothing: the loop skips them
        want = ffn.experts(hidden, index, weights)
        routed = route_dbrx_experts(model)
        assert len(routed) == model.config.n_layers
        got = ffn.experts(hidden, index, weights)
        assert torch.equal(got, want)
        torch._dynamo.reset()
        traced = torch.compile(ffn, backend="eager", fullgraph=True)(hidden)
        assert torch.equal(traced, ffn(hidden))
        unroute_dbrx_experts(routed)
        assert "forward" not in ffn.experts.__dict__ and torch.equal(ffn.experts(hidden, index, weights), want)
        torch._dynamo.reset()
        try:
            torch.compile(ffn, backend="eager", fullgraph=True)(hidden)
        except Exception:  # noqa: BLE001 - Dynamo's own error for the nonzero() loop
            pass
        else:
            raise AssertionError("DBRX's own experts traced as one graph: the op is no longer needed")


def test_a_dbrx_model_the_op_cannot_run_is_refused_with_nothing_changed() -> None:
    """An expert whose activation is not the config's (the op takes it by name) is refused
    before compile changes anything."""
    import moa_flex
    from moa_flex.plan import Plan
    from moa_flex.support import _build

    model = _build("dbrx")
    experts = model.transformer.blocks[0].ffn.experts
    experts.mlp.activation_fn = torch.nn.GELU()
    forward = model.forward
    with pytest.raises(NotImplementedError, match="takes the activation by its name"):
        moa_flex.compile(model, Plan.dense(model.config), backend="eager")
    assert not any("forward" in m.__dict__ for m in model.modules() if type(m).__name__ == "DbrxExperts")
    assert model.forward == forward and getattr(model, "moa_flex", None) is None
