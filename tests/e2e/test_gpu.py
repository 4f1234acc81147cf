"""``--device cuda`` runs the same pipeline as the CPU and gives the same patch (skipped without CUDA)."""

from __future__ import annotations

import pytest
import torch

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA"),
]


@pytest.mark.parametrize("arch", ["llama", "llava", "qwen2vl"])
def test_cuda_patch_matches_cpu(pico, arch):
    from model_tailor.api import tailor

    pair = pico(arch)
    fields = {"density": 0.25, "block_size": 16, "samples": 8}
    cpu = tailor(pair.base, pair.finetuned, pair.calibration, device="cpu", **fields).patch
    gpu = tailor(pair.base, pair.finetuned, pair.calibration, device="cuda", **fields).patch
    assert sorted(cpu.tensors) == sorted(gpu.tensors)
    for name, tp in cpu.tensors.items():
        other = gpu.tensors[name]
        assert tp.nnz == other.nnz, name
        # fp32 maths on two devices: masks may differ only where scores nearly tie; the deltas stay close.
        agree = (tp.to_dense().ne(0) == other.to_dense().ne(0)).float().mean().item()
        assert agree > 0.98, (name, agree)
        if agree == 1.0:
            torch.testing.assert_close(tp.to_dense(), other.to_dense(), atol=2e-3, rtol=0)
