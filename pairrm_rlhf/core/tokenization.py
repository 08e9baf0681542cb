"""Tokenization exactly as PairRM was trained, and the token layout of one pair.

transformers 5's DeBERTa tokenizer class rebuilds its text normalizer and splits some text (ellipsis,
ligatures, full-width forms, non-breaking spaces) differently from the fast tokenizer PairRM was trained
with. We therefore load `tokenizer.json` with the `tokenizers` library, or build the same tokenizer from
`spm.model` (what transformers 4's DeBERTa-v2 converter produced), and add special tokens ourselves.

The four prefix tokens are *not* part of the text tokenizer: user text that contains `<|source|>` is
tokenized as ordinary characters and can never create a prefix token.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers

PREFIX_TOKENS = ("<|source|>", "<|candidate1|>", "<|candidate2|>", "<|candidate|>")
SPECIAL_TOKENS = ("[PAD]", "[CLS]", "[SEP]", "[UNK]", "[MASK]")


def tokenizer_from_spm(spm_path: str | Path, do_lower_case: bool = False, split_by_punct: bool = False) -> Tokenizer:
    """The fast DeBERTa-v3 tokenizer built from a sentencepiece model, as transformers 4 converted it."""
    from sentencepiece import sentencepiece_model_pb2

    proto = sentencepiece_model_pb2.ModelProto()
    proto.ParseFromString(Path(spm_path).read_bytes())
    vocab = [(piece.piece, piece.score) for piece in proto.pieces]
    unk_id = next(i for i, piece in enumerate(proto.pieces) if piece.type == 2)  # UNKNOWN
    tokenizer = Tokenizer(models.Unigram(vocab, unk_id=unk_id, byte_fallback=False))

    steps = [normalizers.Lowercase()] if do_lower_case else []
    steps.append(normalizers.Strip())
    if proto.normalizer_spec.precompiled_charsmap:
        steps.append(normalizers.Precompiled(proto.normalizer_spec.precompiled_charsmap))
    steps.append(normalizers.Replace(Regex(" {2,}"), " "))
    tokenizer.normalizer = normalizers.Sequence(steps)

    splitters = [pre_tokenizers.Punctuation(behavior="isolated")] if split_by_punct else []
    splitters.append(pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="always", split=True))
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence(splitters)
    tokenizer.decoder = decoders.Metaspace(replacement="▁", prepend_scheme="always", split=True)
    # Special tokens as DeBERTa-v3 registers them; [MASK] is appended after the sentencepiece vocab.
    tokenizer.add_special_tokens(
        [AddedToken(tok, normalized=(tok == "[UNK]"), special=True) for tok in SPECIAL_TOKENS]
    )
    return tokenizer


def _without_prefix_tokens(tokenizer: Tokenizer) -> Tokenizer:
    """A copy of `tokenizer` whose added-token table lacks the four PairRM prefix tokens."""
    state = json.loads(tokenizer.to_str())
    state["added_tokens"] = [t for t in state["added_tokens"] if t["content"] not in PREFIX_TOKENS]
    return Tokenizer.from_str(json.dumps(state))


def load_text_tokenizer(directory: str | Path, do_lower_case: bool = False, split_by_punct: bool = False) -> Tokenizer:
    """Load the text tokenizer of a checkpoint or base-model directory (tokenizer.json, else spm.model)."""
    directory = Path(directory)
    if (directory / "tokenizer.json").is_file():
        return _without_prefix_tokens(Tokenizer.from_file(str(directory / "tokenizer.json")))
    if (directory / "spm.model").is_file():
        return tokenizer_from_spm(directory / "spm.model", do_lower_case, split_by_punct)
    raise FileNotFoundError(f"{directory} has neither tokenizer.json nor spm.model: cannot build the tokenizer")


# transformers' `clean_up_tokenization_spaces` (tokenization_utils_base `clean_up_tokenization`), in its order
CLEAN_UP_SPACES = ((" .", "."), (" ?", "?"), (" !", "!"), (" ,", ","), (" ' ", "'"), (" n't", "n't"), (" 'm", "'m"),
                   (" 's", "'s"), (" 've", "'ve"), (" 're", "'re"))


def pretruncate(tokenizer: Tokenizer, text: str, max_tokens: int, side: str, clean_up_spaces: bool = False) -> str:
    """`text` cut to `max_tokens` tokens from the `left` or `right` and decoded back to text, as transformers'
    `decode(encode(text, add_special_tokens=False, max_length=n), skip_special_tokens=True)` does with that
    truncation side (Better-PairRM's pre-truncation; the decoded text is tokenized again later).

    The round trip is applied even when nothing is cut: decoding drops special tokens and normalizes whitespace.
    """
    ids = tokenizer.encode(text, add_special_tokens=False).ids
    if len(ids) > max_tokens:
        ids = ids[len(ids) - max_tokens :] if side == "left" else ids[:max_tokens]
    out = tokenizer.decode(ids, skip_special_tokens=True)
    if clean_up_spaces:
        for old, new in CLEAN_UP_SPACES:
            out = out.replace(old, new)
    return out


@dataclass(frozen=True)
class PairLayout:
    """Token ids and length budgets of PairRM's input: `[CLS] <prefix> text [SEP]` three times.

    The source segment holds at most `source_max_length` tokens (specials included); each candidate at most
    `(source_max_length + 2 * candidate_max_length - len(source_segment)) // 2`, so budget the source does not
    use is shared by the candidates. Truncation keeps the left part of the text and all special tokens
    (Better-PairRM: `truncate_source_left` keeps the right part of the source, and `source_prefix_segment`
    puts `<|source|>` in its own `[CLS] <|source|> [SEP]` segment before the text's `[CLS] text [SEP]`).
    The budget depends only on the example itself, so results never depend on batch composition.
    """

    cls_id: int
    sep_id: int
    pad_id: int
    source_prefix_id: int
    cand1_prefix_id: int
    cand2_prefix_id: int
    source_max_length: int = 1224
    candidate_max_length: int = 412
    truncate_source_left: bool = False  # Better-PairRM: keep the end of the source (the latest turns)
    source_prefix_segment: bool = False  # Better-PairRM: `[CLS] <|source|> [SEP]` then `[CLS] text [SEP]`

    @property
    def source_overhead(self) -> int:
        """Special tokens of the source segment (3, or 5 with a separate prefix segment)."""
        return 5 if self.source_prefix_segment else 3

    def source_segment(self, text_ids: list[int]) -> list[int]:
        keep = max(self.source_max_length - self.source_overhead, 0)
        cut_left = self.truncate_source_left and len(text_ids) > keep
        kept = text_ids[len(text_ids) - keep :] if cut_left else text_ids[:keep]
        if self.source_prefix_segment:
            return [self.cls_id, self.source_prefix_id, self.sep_id, self.cls_id, *kept, self.sep_id]
        return [self.cls_id, self.source_prefix_id, *kept, self.sep_id]

    def candidate_budget(self, source_segment_length: int) -> int:
        return (self.source_max_length + 2 * self.candidate_max_length - source_segment_length) // 2

    def pair(self, source_ids: list[int], a_ids: list[int], b_ids: list[int]) -> tuple[list[int], tuple[int, int, int]]:
        """Input ids of one ordered pair and the positions of its three prefix tokens."""
        source = self.source_segment(source_ids)
        keep = max(self.candidate_budget(len(source)) - 3, 0)
        a = [self.cls_id, self.cand1_prefix_id, *a_ids[:keep], self.sep_id]
        b = [self.cls_id, self.cand2_prefix_id, *b_ids[:keep], self.sep_id]
        return source + a + b, (1, len(source) + 1, len(source) + len(a) + 1)

    def pair_length(self, source_length: int, a_length: int, b_length: int) -> int:
        """`len(self.pair(...)[0])` from the three texts' token counts alone (no token list is built)."""
        source = min(source_length, max(self.source_max_length - self.source_overhead, 0)) + self.source_overhead
        keep = max(self.candidate_budget(source) - 3, 0)
        return source + 6 + min(a_length, keep) + min(b_length, keep)

    def is_truncated(self, source_ids: list[int], a_ids: list[int], b_ids: list[int]) -> bool:
        """Whether any of the three texts loses tokens in this pair."""
        if len(source_ids) > self.source_max_length - self.source_overhead:
            return True
        keep = self.candidate_budget(len(source_ids) + self.source_overhead) - 3
        return len(a_ids) > keep or len(b_ids) > keep
