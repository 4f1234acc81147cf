"""BlockHessians: one accumulator per distinct input (q/k/v share one, gate/up share one), no padding."""

from __future__ import annotations

import torch

from model_tailor.pipeline.activations import BlockHessians


def test_llama_block_has_four_hessians_and_masks_padding():
    from transformers import LlamaConfig
    from transformers.models.llama.modeling_llama import LlamaDecoderLayer, LlamaRotaryEmbedding

    torch.manual_seed(0)
    cfg = LlamaConfig(hidden_size=16, intermediate_size=32, num_attention_heads=2, num_key_value_heads=2)
    block = LlamaDecoderLayer(cfg, 0).eval()
    names = ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj", "mlp.gate_proj",
             "mlp.up_proj", "mlp.down_proj"]  # fmt: skip
    stats = BlockHessians({n: block.get_submodule(n) for n in names}, torch.device("cpu"))
    x = torch.randn(2, 5, 16)
    mask = torch.tensor([[1, 1, 1, 1, 1], [1, 1, 1, 0, 0]], dtype=torch.bool)
    pos = torch.arange(5).expand(2, 5)
    cos_sin = LlamaRotaryEmbedding(cfg)(x, pos)
    captured = []
    h = block.self_attn.q_proj.register_forward_hook(lambda m, a, o: captured.append(a[0]))
    for _ in range(2):
        stats.set_masks([mask])
        with torch.no_grad():
            block(x, position_embeddings=cos_sin, position_ids=pos)
        stats.end_batch()
    h.remove()
    assert sorted(stats.groups) == ["mlp.down_proj", "mlp.gate_proj", "self_attn.o_proj", "self_attn.q_proj"]
    assert stats.groups["self_attn.q_proj"] == ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"]
    assert stats.n_tokens("self_attn.v_proj") == 2 * 8  # 8 real tokens per batch, 2 batches
    rows = captured[0][mask]
    torch.testing.assert_close(stats.hessian("self_attn.k_proj"), 2 * rows.T @ rows / rows.shape[0])
    stats.close()


def test_module_that_never_runs_has_no_hessian():
    lin, unused = torch.nn.Linear(3, 3), torch.nn.Linear(3, 3)
    stats = BlockHessians({"a": lin, "b": unused}, torch.device("cpu"))
    lin(torch.randn(4, 3))
    stats.end_batch()
    assert stats.hessian("a") is not None and stats.hessian("b") is None and stats.n_tokens("b") == 0
