"""Caption tokenisation with CLIP's BPE vocabulary (shipped inside open_clip, no download)."""
from __future__ import annotations

import torch
from open_clip.tokenizer import SimpleTokenizer


class CaptionTokenizer:
    """``<sot> words <eot>`` ids, cut to ``max_words`` and 0-padded, plus a mask of real tokens.

    When a caption is too long the tail is cut and ``<eot>`` is kept at the last position,
    because the sentence feature is read at ``<eot>``. The mask comes from the token count, not
    from ``ids != 0``: id 0 is a real BPE token ("!").
    """

    def __init__(self, max_words: int) -> None:
        if max_words < 2:
            raise ValueError(f"max_words={max_words}: need at least 2 positions for <sot> and <eot>")
        self.max_words = max_words
        self._bpe = SimpleTokenizer(context_length=max_words)
        self.sot_id: int = self._bpe.sot_token_id
        self.eot_id: int = self._bpe.eot_token_id

    def __call__(self, captions: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """Returns ``(ids LongTensor [n, max_words], mask BoolTensor [n, max_words])``."""
        if isinstance(captions, str):
            raise TypeError("CaptionTokenizer takes a list of captions, got one str; wrap it in a list")
        n, width = len(captions), self.max_words
        ids = torch.zeros(n, width, dtype=torch.long)
        mask = torch.zeros(n, width, dtype=torch.bool)
        for i, caption in enumerate(captions):
            tokens = [self.sot_id, *self._bpe.encode(caption), self.eot_id]
            if len(tokens) > width:
                tokens = tokens[: width - 1] + [self.eot_id]
            ids[i, : len(tokens)] = torch.tensor(tokens, dtype=torch.long)
            mask[i, : len(tokens)] = True
        return ids, mask
