"""The special tokens every vocabulary Longhaul trains starts with (docs/contracts.md, "Tokens").

Exporters build tokenizers with them; the service pads with ``PAD_ID`` and stops on ``EOS_ID``
unless a manifest's config names other ids (``pad_token_id``, ``eos_token_id``: imported models
keep their own vocabulary).
"""

from __future__ import annotations

PAD_TOKEN = "<pad>"
EOS_TOKEN = "<eos>"
MASK_TOKEN = "<mask>"
CLS_TOKEN = "<cls>"
# In this id order, at the start of the vocabulary.
SPECIAL_TOKENS = (PAD_TOKEN, EOS_TOKEN, MASK_TOKEN, CLS_TOKEN)
PAD_ID, EOS_ID, MASK_ID, CLS_ID = range(len(SPECIAL_TOKENS))
