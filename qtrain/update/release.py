"""Layer-wise gradient release: each tensor is updated inside backward the moment its gradient is final.

The hooks only call the Updater (qtrain.update.updater): the arithmetic is the same as stepping after backward,
but at most one weight's gradient is alive at a time. int8 layers hand dW to their grad sink; float tensors
use post-accumulate-grad hooks (torchtune's optimizer-in-backward pattern).
"""

from __future__ import annotations

from qtrain.update.updater import Updater


class Release:
    """Hooks of one Updater's model; `detach()` removes them (the loop looks the same with release on or off).

    reducer: data parallel's OverlappedReducer, or None. With one, each gradient's all-reduce starts in its
    hook and the update runs when the reducer applies it (a few gradients later, or at the end of backward).
    """

    def __init__(self, updater: Updater, reducer=None):
        self.updater = updater
        self._handles: list = []
        for layer in updater.int8.values():
            if reducer is None:
                layer.grad_sink = updater.update_int8
            else:
                layer.grad_sink = lambda layer, g: reducer.submit(g, lambda: updater.update_int8(layer, g))
        for name, p in updater.floats.items():
            if reducer is None:
                hook = lambda p, name=name: updater.update_float(name, p)  # noqa: E731
            else:
                hook = lambda p, name=name: reducer.submit(p.grad, lambda: updater.update_float(name, p))  # noqa: E731
            self._handles.append(p.register_post_accumulate_grad_hook(hook))

    def detach(self) -> None:
        for layer in self.updater.int8.values():
            layer.grad_sink = None
        for h in self._handles:
            h.remove()
        self._handles.clear()


def attach_release(updater: Updater, reducer=None) -> Release:
    """Start layer-wise release on updater's model; returns the handle that detaches it."""
    return Release(updater, reducer)
