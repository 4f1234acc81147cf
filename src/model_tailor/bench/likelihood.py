"""TailorBench likelihood score: the teacher-forced log-probability of each item's reference answer.

Greedy accuracy is a coarse, noisy 0/1 per item; the likelihood of the reference answer moves smoothly with
the weights and costs one forward pass per item (no decoding loop). The score of an item is the mean
per-token log-probability of its reference answer tokens (the answer text followed by the end-of-turn token,
exactly the tokens the training loss covers, ``data.answer_ids``) given the rendered prompt. How the bench
turns it into a retention and a target ratio is documented in ``bench.stats``.

Batches reuse the decoder's layout (``data.collate_generate``): the prompt prefix every item shares runs once,
its KV cache is repeated across the batch, and each row's prompt suffix plus answer is left-padded, so every
answer ends at the right edge and only the last ``max answer length + 1`` positions need logits.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from tqdm.auto import tqdm

from model_tailor.bench.data import Example, PixelCache, answer_ids, collate_generate, prompt_ids, shared_prefix
from model_tailor.bench.tasks import cache_name, prefix_cache


@torch.no_grad()
def answer_logprobs(
    model,
    processor,
    examples: Sequence[Example],
    pixels: PixelCache,
    *,
    batch_size: int,
    image_tokens: int,
    desc: str = "log-likelihood",
    references: Sequence[list[int]] | None = None,
) -> list[float]:
    """Mean per-token log-probability of each example's reference answer: ``Example.response`` and the
    end-of-turn token, or exactly the token ids ``references`` gives per example (the drift probe's)."""
    tok = processor.tokenizer
    device = next(model.parameters()).device
    prompts = prompt_ids(tok, examples, image_tokens)
    answers = [list(r) for r in references] if references is not None else answer_ids(tok, examples)
    if len(answers) != len(examples) or not all(answers):
        raise ValueError("every example needs a non-empty reference answer")
    prefix = shared_prefix(prompts, getattr(model.config, "image_token_id", None))  # leaves every prompt a token
    rows = [p + a for p, a in zip(prompts, answers, strict=True)]
    key = cache_name(model)
    out: list[float] = []
    for start in tqdm(range(0, len(examples), batch_size), desc=desc, unit="batch", leave=False):
        batch = examples[start : start + batch_size]
        lengths = torch.tensor([len(a) for a in answers[start : start + len(batch)]], device=device)
        inputs = {
            k: v.to(device)
            for k, v in collate_generate(rows[start : start + len(batch)], prefix, tok.pad_token_id).items()
        }
        extra = {"pixel_values": pixels.get([ex.image for ex in batch]).to(device)} if batch[0].image else {}
        cache = prefix_cache(model, rows[0][:prefix], len(batch), device)
        keep = int(lengths.max()) + 1
        logits = model(
            **inputs, use_cache=cache is not None, logits_to_keep=keep, **({key: cache} if cache else {}), **extra
        ).logits
        logp = torch.log_softmax(logits[:, :-1].float(), dim=-1)
        targets = inputs["input_ids"][:, -(keep - 1) :]
        token_lp = logp.gather(-1, targets[..., None])[..., 0]  # (batch, keep - 1): log p of each next token
        is_answer = torch.arange(keep - 1, device=device)[None, :] >= (keep - 1 - lengths)[:, None]
        out.extend(((token_lp * is_answer).sum(1) / lengths).tolist())
    return out
