"""A word-level tokenizer saved in the standard tokenizer files.

The embedded default backbone speaks the small closed vocabulary of the scenes world, so a
byte-pair tokenizer (which would need downloaded merges) is replaced by a word-level one built
with `tokenizers` and wrapped as a transformers `PreTrainedTokenizerFast`: `save_pretrained`
writes tokenizer.json / tokenizer_config.json and `AutoTokenizer.from_pretrained` reads them.
"""

from __future__ import annotations

from collections.abc import Iterable

from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors
from transformers import PreTrainedTokenizerFast

PAD, UNK, BOS, EOS = "<pad>", "<unk>", "<|startoftext|>", "<|endoftext|>"


def build_word_tokenizer(vocabulary: Iterable[str], max_length: int = 16) -> PreTrainedTokenizerFast:
    """Lower-cased, whitespace/punctuation split, one id per word; BOS ... EOS, padded to max_length."""
    words = sorted({w.lower() for w in vocabulary} - {PAD, UNK, BOS, EOS})
    vocab = {tok: i for i, tok in enumerate([PAD, UNK, BOS, EOS, *words])}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token=UNK))
    tok.normalizer = normalizers.Lowercase()
    tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.WhitespaceSplit(), pre_tokenizers.Punctuation("removed")])
    tok.post_processor = processors.TemplateProcessing(
        single=f"{BOS} $A {EOS}", special_tokens=[(BOS, vocab[BOS]), (EOS, vocab[EOS])]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token=BOS,
        eos_token=EOS,
        unk_token=UNK,
        pad_token=PAD,
        model_max_length=max_length,
        padding_side="right",
    )
