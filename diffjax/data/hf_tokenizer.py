"""diffjax's tokenizers as Hugging Face tokenizer files: `tokenizer.json` (the `tokenizers` library's format) and
`tokenizer_config.json`, which `transformers.AutoTokenizer.from_pretrained` loads as a fast tokenizer that encodes
and decodes as diffjax does. Writing them needs the `tokenizers` package (a dependency of transformers).

Bytes: a BPE model without merges over the 256 byte-level characters (GPT-2's printable stand-ins for bytes), so
token b is byte b, then EOS and PAD as special tokens. The byte-level decoder joins the bytes and replaces invalid
UTF-8 as Python's `errors='replace'` does.

SentencePiece: the unigram model's pieces and scores, with byte fallback, a '▁' prepended to the text (SentencePiece's
dummy prefix) and spaces written as '▁'; the decoder undoes both. SentencePiece never matches its control and byte
pieces against text, but a Hugging Face unigram model matches every piece, so those get a score far below any
other: a literal '</s>' or '<0x41>' in the text then spells out from its characters, as in SentencePiece, whenever
those characters are in the vocabulary. One difference remains in decoding: a run of byte pieces that is not valid
UTF-8 becomes one U+FFFD per byte in Hugging Face's byte-fallback decoder, where SentencePiece replaces only the
invalid bytes. The SentencePiece model itself goes beside them as `tokenizer.model` (the name of transformers' own
SentencePiece files; the fast tokenizer ignores it), so that diffjax reads back the very model it trained with.

Both set `split_special_tokens`, so text that spells a special token is encoded as text, as diffjax does, and the
end-of-document token doubles as BOS: in training every document follows one. `read_tokenizer` reads either back
from a directory, for a model imported into diffjax.
"""

import json
import os

import sentencepiece as spm

from diffjax.data import tokenizers
from diffjax.errors import ConfigError

TOKENIZER_FILES = ('tokenizer.json', 'tokenizer_config.json')
SENTENCEPIECE_FILE = 'tokenizer.model'
_BYTE_EOS, _BYTE_PAD = '<eos>', '<pad>'
_SP_PREFIX = '▁'  # SentencePiece's visible space


def _byte_level_vocab() -> dict[str, int]:
  """Byte-level BPE's vocabulary (GPT-2's table), character -> byte: printable Latin-1 characters stand for
  themselves, the other 68 bytes for U+0100 onwards in byte order, so no byte is a space or control character."""
  printable = [*range(ord('!'), ord('~') + 1), *range(ord('¡'), ord('¬') + 1), *range(ord('®'), ord('ÿ') + 1)]
  others = iter(range(256, 256 + 256 - len(printable)))
  return {chr(b) if b in printable else chr(next(others)): b for b in range(256)}


def _byte_tokenizer(library, tokenizer: tokenizers.ByteTokenizer):
  result = library.Tokenizer(library.models.BPE(vocab=_byte_level_vocab(), merges=[]))
  result.pre_tokenizer = library.pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
  result.decoder = library.decoders.ByteLevel()
  specials = {tokenizer.eos_id: _BYTE_EOS, tokenizer.pad_id: _BYTE_PAD}
  result.add_special_tokens([library.AddedToken(specials[i], special=True) for i in sorted(specials)])
  return result, {'eos_token': _BYTE_EOS, 'bos_token': _BYTE_EOS, 'pad_token': _BYTE_PAD}


def _sentencepiece_tokenizer(library, tokenizer: tokenizers.SentencePieceTokenizer):
  models, normalizers, decoders = library.models, library.normalizers, library.decoders
  processor = spm.SentencePieceProcessor(model_proto=tokenizer.model_proto)
  ids = range(processor.vocab_size())
  never_matched = {i for i in ids if processor.is_control(i) or processor.is_byte(i) or processor.is_unknown(i)}
  lowest = min(processor.get_score(i) for i in ids if i not in never_matched)
  vocab = [(processor.id_to_piece(i), lowest - 1e6 if i in never_matched else processor.get_score(i)) for i in ids]
  result = library.Tokenizer(models.Unigram(vocab, unk_id=processor.unk_id(), byte_fallback=True))
  adds_prefix = processor.encode('a', out_type=str)[0].startswith(_SP_PREFIX)  # the model's add_dummy_prefix
  spaces = normalizers.Replace(' ', _SP_PREFIX)
  result.normalizer = normalizers.Sequence([normalizers.Prepend(_SP_PREFIX), spaces]) if adds_prefix else spaces
  steps = [decoders.Replace(_SP_PREFIX, ' '), decoders.ByteFallback(), decoders.Fuse()]
  result.decoder = decoders.Sequence(steps + ([decoders.Strip(' ', 1, 0)] if adds_prefix else []))
  specials = [i for i in ids if processor.is_control(i) or processor.is_unknown(i)]
  result.add_special_tokens([library.AddedToken(processor.id_to_piece(i), special=True) for i in specials])
  eos = processor.id_to_piece(tokenizer.eos_id)
  return result, {'eos_token': eos, 'bos_token': eos, 'pad_token': processor.id_to_piece(tokenizer.pad_id),
                  'unk_token': processor.id_to_piece(processor.unk_id())}


def save_tokenizer(tokenizer: tokenizers.Tokenizer, path: str, max_len: int) -> dict:
  """Writes TOKENIZER_FILES for `tokenizer` into the directory `path`; returns the special-token ids for the
  model's config (bos_token_id, eos_token_id, pad_token_id)."""
  try:
    import tokenizers as library  # pylint: disable=import-outside-toplevel  (Hugging Face's, not ours)
  except ImportError:
    raise ConfigError(f'{path}: writing the tokenizer needs the tokenizers package (pip install -e ".[hf]")') from None
  if isinstance(tokenizer, tokenizers.ByteTokenizer):
    result, special_tokens = _byte_tokenizer(library, tokenizer)
  elif isinstance(tokenizer, tokenizers.SentencePieceTokenizer):
    result, special_tokens = _sentencepiece_tokenizer(library, tokenizer)
    tokenizer.save(os.path.join(path, SENTENCEPIECE_FILE))
  else:
    raise ConfigError(f'tokenizer: {type(tokenizer).__name__} has no Hugging Face export; give a ByteTokenizer or '
                      'a SentencePieceTokenizer')
  result.save(os.path.join(path, TOKENIZER_FILES[0]))
  tokenizer_config = {'tokenizer_class': 'PreTrainedTokenizerFast', **special_tokens, 'model_max_length': max_len,
                      'split_special_tokens': True, 'clean_up_tokenization_spaces': False}
  with open(os.path.join(path, TOKENIZER_FILES[1]), 'w', encoding='utf-8') as f:
    json.dump(tokenizer_config, f, indent=2, sort_keys=True, ensure_ascii=False)
    f.write('\n')
  return {'bos_token_id': tokenizer.eos_id, 'eos_token_id': tokenizer.eos_id, 'pad_token_id': tokenizer.pad_id}


def read_tokenizer(path: str) -> tokenizers.Tokenizer | None:
  """The diffjax tokenizer in a Hugging Face directory: the SentencePiece model in its `tokenizer.model` (which must be
  one diffjax trains, or ConfigError says why not), else bytes if its tokenizer.json is the byte-level one
  `save_tokenizer` writes; None if it holds neither."""
  model_file = os.path.join(path, SENTENCEPIECE_FILE)
  if os.path.isfile(model_file):
    return tokenizers.SentencePieceTokenizer.load(
        model_file, key='--hf_dir', remedy='pass the tokenizer the model was trained with: --tokenizer=byte or '
        '--tokenizer=PATH of its SentencePiece .model file')
  try:
    with open(os.path.join(path, TOKENIZER_FILES[0]), encoding='utf-8') as f:
      saved = json.load(f)
  except (OSError, ValueError):  # none, or not JSON: not one diffjax wrote
    return None
  return tokenizers.ByteTokenizer() if _is_byte_tokenizer(saved) else None


def _is_byte_tokenizer(saved) -> bool:
  """Whether a tokenizer.json encodes and decodes as `_byte_tokenizer` writes it: token b is byte b, then EOS, PAD."""
  if not isinstance(saved, dict):
    return False
  model, pre_tokenizer = saved.get('model') or {}, saved.get('pre_tokenizer') or {}
  specials = {token.get('id'): token.get('content') for token in saved.get('added_tokens') or []}
  return (model.get('type') == 'BPE' and not model.get('merges')
          and model.get('vocab') == _byte_level_vocab()
          and specials == {tokenizers.ByteTokenizer.eos_id: _BYTE_EOS, tokenizers.ByteTokenizer.pad_id: _BYTE_PAD}
          and pre_tokenizer.get('type') == 'ByteLevel' and pre_tokenizer.get('add_prefix_space') is False
          and pre_tokenizer.get('use_regex') is False and (saved.get('decoder') or {}).get('type') == 'ByteLevel'
          and saved.get('normalizer') is None and saved.get('post_processor') is None)
