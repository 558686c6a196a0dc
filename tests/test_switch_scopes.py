"""The switches that pick an eager reference twin of a fast path (``moelora.layers.dispatch``) are
scoped: each context manager puts the previous value back when its block exits, by an exception
too, and nests."""
import pytest

from moelora.layers import dispatch

SWITCHES = [  # (context manager, reader, the reader's value when the twin is on)
    (dispatch.eager_mixed_batches, dispatch.gathered_mixed_training, False),
    (dispatch.plain_mixture_backward, dispatch.mixture_recompute_enabled, False),
    (dispatch.eager_routing_records, dispatch.lazy_routing_records, False),
]


@pytest.mark.parametrize("switch,reader,twin", SWITCHES, ids=lambda v: getattr(v, "__name__", ""))
def test_switch_restores_after_an_exception(switch, reader, twin):
    assert reader() is not twin  # the fast path by default
    with pytest.raises(RuntimeError, match="inside"):
        with switch():
            assert reader() is twin
            raise RuntimeError("inside")
    assert reader() is not twin
    with switch():  # nested: the inner block restores the outer block's value
        with pytest.raises(RuntimeError):
            with switch(False):
                assert reader() is not twin
                raise RuntimeError("inside")
        assert reader() is twin
    assert reader() is not twin
