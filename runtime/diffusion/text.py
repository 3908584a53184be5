"""A word-level tokenizer saved in the standard tokenizer files.

The embedded default backbone speaks the small closed vocabulary of the scenes world, so a
byte-pair tokenizer (which would need downloaded merges) is replaced by a word-level one built
with `tokenizers` and wrapped as a transformers `PreTrainedTokenizerFast`: `save_pretrained`
writes tokenizer.json / tokenizer_config.json and `AutoTokenizer.from_pretrained` reads them.
"""

from __future__ import annotations

import json
import tempfile
from collections.abc import Iterable
from pathlib import Path

from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors
from transformers import PreTrainedTokenizerBase, PreTrainedTokenizerFast

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


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2/CLIP's reversible byte -> printable character map (the BPE's base alphabet)."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, map(chr, cs)))


def _merge(symbols: list[str], pair: tuple[str, str]) -> list[str]:
    out, i = [], 0
    while i < len(symbols):
        if i + 1 < len(symbols) and (symbols[i], symbols[i + 1]) == pair:
            out.append(symbols[i] + symbols[i + 1])
            i += 2
        else:
            out.append(symbols[i])
            i += 1
    return out


def learn_merges(words: Iterable[str]) -> list[tuple[str, str]]:
    """Byte-pair merges, learnt the usual way (most frequent pair first, ties broken by the pair),
    until every word is one token; CLIP's convention marks a word's last symbol with "</w>"."""
    seqs = [list(w[:-1]) + [w[-1] + "</w>"] for w in sorted({w.lower() for w in words})]
    merges: list[tuple[str, str]] = []
    while any(len(s) > 1 for s in seqs):
        counts: dict[tuple[str, str], int] = {}
        for s in seqs:
            for pair in zip(s, s[1:]):
                counts[pair] = counts.get(pair, 0) + 1
        pair = max(counts, key=lambda p: (counts[p], p))
        merges.append(pair)
        seqs = [_merge(s, pair) for s in seqs]
    return merges


def write_clip_tokenizer_files(vocabulary: Iterable[str], folder: str | Path) -> None:
    """vocab.json and merges.txt in CLIP's format: the 256 byte symbols, the same with "</w>", one token
    per merge, then the two specials. Words outside `vocabulary` still tokenize (into pieces)."""
    words = [w.lower() for w in vocabulary]
    if any(not w.isascii() or not w.isalpha() for w in words):
        raise ValueError(f"vocabulary words must be ASCII letters: {[w for w in words if not (w.isascii() and w.isalpha())]}")
    base = list(_bytes_to_unicode().values())
    merges = learn_merges(words)
    tokens = base + [b + "</w>" for b in base] + ["".join(p) for p in merges] + [BOS, EOS]
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "vocab.json").write_text(json.dumps({t: i for i, t in enumerate(tokens)}, ensure_ascii=False) + "\n")
    (folder / "merges.txt").write_text("#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in merges))


def build_clip_tokenizer(vocabulary: Iterable[str], max_length: int = 24) -> PreTrainedTokenizerBase:
    """A standard `CLIPTokenizer` whose byte-pair merges make every vocabulary word one token, so that
    `CLIPTokenizer.from_pretrained` (and Stable Diffusion pipelines) read the saved folder as is."""
    from transformers import CLIPTokenizer

    with tempfile.TemporaryDirectory() as tmp:
        write_clip_tokenizer_files(vocabulary, tmp)
        tok = CLIPTokenizer.from_pretrained(tmp, model_max_length=max_length, pad_token=EOS, local_files_only=True)
    for word in vocabulary:
        ids = tok(word, add_special_tokens=False).input_ids
        if len(ids) != 1:
            raise AssertionError(f"word {word!r} tokenizes to {len(ids)} tokens")
    return tok


def save_tokenizer(tokenizer: PreTrainedTokenizerBase, folder: str | Path) -> None:
    """`save_pretrained`, and for a CLIP tokenizer also the standard vocab.json and merges.txt that
    `CLIPTokenizer.from_pretrained` of any transformers version reads (transformers 5 writes only
    tokenizer.json)."""
    folder = Path(folder)
    tokenizer.save_pretrained(folder)
    config_file = folder / "tokenizer_config.json"
    config = json.loads(config_file.read_text())
    for key in ("is_local", "local_files_only"):  # loading options, not properties of the tokenizer
        config.pop(key, None)
    config_file.write_text(json.dumps(config, indent=2) + "\n")
    if type(tokenizer).__name__.startswith("CLIPTokenizer"):
        model = json.loads((folder / "tokenizer.json").read_text())["model"]
        merges = [m if isinstance(m, str) else " ".join(m) for m in model["merges"]]
        (folder / "vocab.json").write_text(json.dumps(model["vocab"], ensure_ascii=False) + "\n")
        (folder / "merges.txt").write_text("#version: 0.2\n" + "".join(m + "\n" for m in merges))
