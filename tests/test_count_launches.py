"""qtrain.update.launch_count (tools/count_launches.py): what it counts as a launch, and the launch structure of a tiny release step."""

import torch

from qtrain.update import launch_count as cl


def test_views_allocations_and_markers_are_not_launches():
    aten = torch.ops.aten
    assert not any(cl.launches(op) for op in (aten.view.default, aten.t.default, aten.transpose.int,
                                              aten.empty.memory_format, aten.detach.default, aten.split.Tensor,
                                              aten._unsafe_view.default, aten.expand.default))
    assert all(cl.launches(op) for op in (aten.add_.Tensor, aten.mm.default, aten._to_copy.default,
                                          aten.copy_.default, aten.randn.generator, aten._foreach_copy_.default))


def test_a_tiny_release_step_counts_the_cuda_path():
    counts = {n: cl.count_step(cl.recipe_cfg("tiny", [], n, 8), steps=2) for n in (1, 2)}
    for n, (counter, syncs) in counts.items():
        assert syncs.total == 0, syncs.where
        int8 = 7 * n
        # per int8 weight: dequantize in forward and for dx, APOLLO's two statistics kernels, the fused update
        assert sum(v for op, v in counter.by_op.items() if op.startswith("triton::_")
                   and "rms" not in op) == 5 * int8
        # RMSNorm (2 per layer + the final one): one fused kernel forward, one backward (qtrain.model.rms_norm)
        assert counter.by_op["triton::_rms_forward_kernel"] == counter.by_op["triton::_rms_backward_kernel"] == 2 * n + 1
        # the global grad norm: APOLLO's statistics write the int8 weights' norms (no launch); one launch for
        # the fused norm-weight group, one per other float tensor (embedding, lm_head), two in take()
        assert counter.by_phase["grad norm"] == 1 + 2 + 2
        assert counter.by_op["aten::linalg_vector_norm"] == 1 + 2 + 1
        assert counter.by_op["aten::randn"] == int8  # the rank-1 projection: one draw, no scaling launch
    (one, _), (two, _) = counts[1], counts[2]
    assert one.by_phase["finish_step"] == two.by_phase["finish_step"] > 0  # one fused step for every norm
    assert two.by_phase["float updates"] - one.by_phase["float updates"] == 2  # a layer's 2 norms: a copy each
