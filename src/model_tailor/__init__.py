"""model-tailor: repair catastrophic forgetting after fine-tuning (Model Tailor, Zhu et al., ICML 2024).

Vocabulary (used everywhere): ``base`` and ``finetuned`` weights, ``delta = finetuned - base``,
``density`` = fraction of the delta KEPT in the patch, ``keep_mask`` True = in the patch,
scores: higher = keep. Keys are full Hugging Face parameter names.
"""

from __future__ import annotations

__version__ = "0.1.0"
