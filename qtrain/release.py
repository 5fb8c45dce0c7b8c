"""Layer-wise gradient release: each tensor is updated inside backward the moment its gradient is final.

The hooks only call the Updater (qtrain.updater): the arithmetic is the same as stepping after backward,
but at most one weight's gradient is alive at a time. int8 layers hand dW to their grad sink; float tensors
use post-accumulate-grad hooks (torchtune's optimizer-in-backward pattern).
"""

from __future__ import annotations

from qtrain.updater import Updater


class Release:
    """Hooks of one Updater's model; `detach()` removes them (the loop looks the same with release on or off)."""

    def __init__(self, updater: Updater):
        self.updater = updater
        self._handles: list = []
        for layer in updater.int8.values():
            layer.grad_sink = updater.update_int8
        for name, p in updater.floats.items():
            self._handles.append(p.register_post_accumulate_grad_hook(lambda p, name=name: updater.update_float(name, p)))

    def detach(self) -> None:
        for layer in self.updater.int8.values():
            layer.grad_sink = None
        for h in self._handles:
            h.remove()
        self._handles.clear()


def attach_release(updater: Updater) -> Release:
    """Start layer-wise release on updater's model; returns the handle that detaches it."""
    return Release(updater)
