"""Tokenizers: UTF-8 bytes, or a SentencePiece model trained on the training split."""

import io
import os
import re
from collections.abc import Iterable, Sequence
from typing import Protocol

from etils import epath
from google.protobuf import message
import numpy as np
import sentencepiece as spm
from sentencepiece import sentencepiece_model_pb2

from diffjax.errors import ConfigError


class Tokenizer(Protocol):
  """What the input pipeline and the sampler need from a tokenizer."""

  vocab_size: int
  eos_id: int
  pad_id: int

  def encode(self, text: str) -> list[int]:
    ...

  def encode_batch(self, texts: Sequence[str]) -> list[np.ndarray]:
    """The ids of each text, as arrays; fast enough to tokenize a whole corpus once."""

  def decode(self, ids: Sequence[int]) -> str:
    """Text of `ids`; EOS, PAD and unknown ids are dropped, never raising."""


class ByteTokenizer:
  """One token per UTF-8 byte (ids 0..255), then EOS and PAD: no training, no unknown tokens."""

  vocab_size = 258
  eos_id = 256
  pad_id = 257

  def encode(self, text: str) -> list[int]:
    return list(text.encode('utf-8'))

  def encode_batch(self, texts: Sequence[str]) -> list[np.ndarray]:
    return [np.frombuffer(text.encode('utf-8'), np.uint8) for text in texts]

  def decode(self, ids: Sequence[int]) -> str:
    # A model can emit a truncated or invalid multi-byte sequence; show it rather than fail.
    return bytes(int(i) for i in ids if 0 <= i < 256).decode('utf-8', errors='replace')


# Fixed ids so a model's embedding rows mean the same thing for every trained vocabulary.
_SP_PAD_ID, _SP_EOS_ID, _SP_UNK_ID = 0, 1, 2
# 256 byte-fallback pieces, the three ids above and the newline piece.
SP_MIN_VOCAB_SIZE = 256 + 3 + 1


class SentencePieceTokenizer:
  """A SentencePiece unigram model that reproduces its input text exactly.

  Byte fallback spells any character outside the learned vocabulary as UTF-8 bytes, and the identity
  normalization keeps whitespace and newlines as they are, which code and prose with line structure need.
  """

  def __init__(self, model_proto: bytes):
    self.model_proto = model_proto
    self._processor = processor = spm.SentencePieceProcessor(model_proto=model_proto)
    self.vocab_size, self.eos_id, self.pad_id = processor.vocab_size(), processor.eos_id(), processor.pad_id()

  @classmethod
  def train(cls, texts: Iterable[str], *, vocab_size: int) -> 'SentencePieceTokenizer':
    """Learns a vocabulary of `vocab_size` pieces (at least SP_MIN_VOCAB_SIZE, which the data config checks) from
    `texts`; raises ConfigError if it cannot."""
    model = io.BytesIO()
    try:
      spm.SentencePieceTrainer.train(
          sentence_iterator=_training_lines(texts), model_writer=model, vocab_size=vocab_size, model_type='unigram',
          normalization_rule_name='identity', remove_extra_whitespaces=False, byte_fallback=True,
          allow_whitespace_only_pieces=True, split_digits=True, user_defined_symbols=['\n'],
          pad_id=_SP_PAD_ID, eos_id=_SP_EOS_ID, unk_id=_SP_UNK_ID, bos_id=-1,
          max_sentence_length=1 << 16, num_threads=os.cpu_count() or 1, minloglevel=2)
    except RuntimeError as e:
      raise ConfigError(_vocab_size_error(vocab_size, str(e))) from e
    return cls(model.getvalue())

  @classmethod
  def load(cls, path: epath.PathLike, *, key: str, remedy: str) -> 'SentencePieceTokenizer':
    """The model saved at `path`. A file that cannot be read, or is not a whole model as `train` writes them,
    raises ConfigError `KEY: PATH is damaged (why); REMEDY`, so a damaged file is never taken for a model of
    another vocabulary size."""
    try:
      model_proto = epath.Path(path).read_bytes()
    except OSError as error:
      raise ConfigError(f'{key}: {path} cannot be read ({error.strerror or error}); {remedy}') from None
    fault = _model_fault(model_proto)
    if fault is None:
      try:
        return cls(model_proto)
      except RuntimeError:  # SentencePiece's message is a line of its C++ source, which helps no one here
        fault = 'SentencePiece cannot load it'
    raise ConfigError(f'{key}: {path} is damaged ({fault}); {remedy}')

  def save(self, path: epath.PathLike) -> None:
    path = epath.Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    # Write then rename, so a crash never leaves a truncated model for a resumed run to load.
    partial = path.parent / f'{path.name}.partial'
    partial.write_bytes(self.model_proto)
    partial.replace(path)

  def encode(self, text: str) -> list[int]:
    return self._processor.encode(text)

  def encode_batch(self, texts: Sequence[str]) -> list[np.ndarray]:
    ids = self._processor.encode(list(texts), num_threads=os.cpu_count() or 1)
    return [np.asarray(row, np.int32) for row in ids]

  def decode(self, ids: Sequence[int]) -> str:
    # The processor turns control ids (PAD, EOS) into nothing but rejects ids outside the vocabulary.
    return self._processor.decode([int(i) for i in ids if 0 <= i < self.vocab_size])


def _training_lines(texts: Iterable[str]) -> Iterable[str]:
  # The trainer learns from single lines; the newline itself is the user-defined piece.
  return (line for text in texts for line in text.split('\n') if line)


def _model_fault(model_proto: bytes) -> str | None:
  """Why `model_proto` is not a whole model as `SentencePieceTokenizer.train` writes them, or None.

  Checked on the protobuf, before SentencePiece sees it: SentencePiece takes an empty or cut-short model without a
  word (its normalizer, the last field, then falls back to its defaults), and logs from C++ on every use of one it
  could not build.
  """
  if not model_proto:
    return 'it is empty'
  try:
    proto = sentencepiece_model_pb2.ModelProto.FromString(model_proto)
  except message.DecodeError:
    return 'it is not a SentencePiece model'
  trainer, normalizer = proto.trainer_spec, proto.normalizer_spec
  found_and_wanted = {
      'pieces': (len(proto.pieces), trainer.vocab_size),
      'normalizer': (normalizer.name, 'identity'),
      'remove_extra_whitespaces': (normalizer.remove_extra_whitespaces, False),
      'byte_fallback': (trainer.byte_fallback, True),
      'PAD, EOS, UNK ids': ((trainer.pad_id, trainer.eos_id, trainer.unk_id), (_SP_PAD_ID, _SP_EOS_ID, _SP_UNK_ID)),
  }
  wrong = [f'{name} {found!r}, not {wanted!r}' for name, (found, wanted) in found_and_wanted.items() if found != wanted]
  return f'cut short or not a model diffjax trains: {"; ".join(wrong)}' if wrong else None


def _vocab_size_error(vocab_size: int, trainer_message: str) -> str:
  """One actionable line from the trainer's multi-line complaint about the vocabulary size."""
  if too_small := re.search(r'smaller than required_chars\. \d+ vs (\d+)', trainer_message):
    return (f'data.sp_vocab_size: {vocab_size} is too small for the characters of this corpus; '
            f'use at least {too_small.group(1)}')
  if too_large := re.search(r'Vocabulary size too high \(\d+\)\. Please set it to a value <= (\d+)', trainer_message):
    return (f'data.sp_vocab_size: {vocab_size} is more pieces than the training text supports; use at most '
            f'{too_large.group(1)}, or give the trainer more text (data.sp_train_chars, a larger corpus)')
  first_line = trainer_message.strip().splitlines()[0] if trainer_message.strip() else 'unknown error'
  return f'data.sp_vocab_size: SentencePiece training failed with vocab_size={vocab_size}: {first_line}'
