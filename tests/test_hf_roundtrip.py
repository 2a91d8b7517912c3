"""A trained run exported to Hugging Face and used there as a user would: AutoTokenizer, AutoModelForCausalLM and
greedy generate give diffjax's tokens, logits and continuations; SentencePiece vocabularies export exactly too."""

import json
import random

import numpy as np
import pytest

import diffjax
import helpers_training as ht
from conftest import assert_close
from diffjax.data import hf_tokenizer, tokenizers
from diffjax.errors import ConfigError
from diffjax.infer import generate, load
from diffjax.model.transformer import Transformer
from diffjax.train import loop as trainer

torch = pytest.importorskip('torch')
transformers = pytest.importorskip('transformers')

# Text with what a tokenizer can get wrong: leading, repeated and trailing spaces, tabs, newlines, accents, CJK,
# an emoji (4 UTF-8 bytes), punctuation that Hugging Face's clean-up would glue, and special tokens' spellings.
TEXTS = ['', ' ', 'def f(x):\n    return x  \n', '  two leading, then  two.', 'a , b . c ! d ?', "don't\tstop",
         'héllo wörld 日本語 🙂', '\n\nafter blank lines', '<eos><pad></s><pad><unk><0x41>', 'x' * 300]


def _random_texts(seed: int, count: int) -> list[str]:
  rng = random.Random(seed)
  alphabet = 'the of and ' + 'abcxyzTHE,.!?()[]{}<>/0123456789\n\t  éü日🙂'
  return [''.join(rng.choice(alphabet) for _ in range(rng.randint(0, 40))) for _ in range(count)]


@pytest.fixture(scope='module')
def exported(tmp_path_factory):
  """(workdir, export directory) of a DIFF V1 byte-level run trained 30 steps and exported with `run_to_hf`."""
  root = tmp_path_factory.mktemp('hf_roundtrip')
  overrides = ht.run_overrides(ht.write_corpus(root / 'corpus', num_docs=3, chars_per_doc=8_000), root / 'data',
                               train__steps=30, checkpoint__every_steps=30, checkpoint__async_save=False,
                               log__eval_every_steps=30, log__sample_tokens=0)
  workdir = root / 'run'
  workdir.mkdir()
  trainer.Run(ht.load_config(overrides), str(workdir)).train()
  out = root / 'hf'
  assert diffjax.run_to_hf(workdir, out) == str(out)
  return workdir, out


def _assert_same_tokenizer(ours: tokenizers.Tokenizer, theirs, texts: list[str], id_sequences: list[list[int]]):
  for text in texts:
    ids = theirs(text)['input_ids']
    assert ids == list(ours.encode(text)), text
    assert theirs.decode(ids) == ours.decode(ids) == text
  for ids in id_sequences:
    assert theirs.decode(ids, skip_special_tokens=True) == ours.decode(ids), ids


@pytest.mark.slow  # the fixture trains and exports a run: about a minute on 2 CPUs
def test_the_export_holds_the_tokenizer_and_its_special_ids(exported):
  _, out = exported
  assert {'tokenizer.json', 'tokenizer_config.json', 'generation_config.json'} <= {p.name for p in out.iterdir()}
  ours = tokenizers.ByteTokenizer()
  config = json.loads((out / 'config.json').read_text())
  assert (config['bos_token_id'], config['eos_token_id'], config['pad_token_id']) == (256, 256, 257)
  generation_config = transformers.GenerationConfig.from_pretrained(out)
  assert (generation_config.eos_token_id, generation_config.pad_token_id) == (ours.eos_id, ours.pad_id)
  theirs = transformers.AutoTokenizer.from_pretrained(out)
  assert (theirs.eos_token_id, theirs.pad_token_id, theirs.bos_token_id, len(theirs)) == (256, 257, 256, 258)
  rng = np.random.default_rng(0)
  # Random ids: invalid UTF-8, EOS and PAD mid-text, and ids past the tokenizer (the model's vocabulary is 384).
  id_sequences = [list(range(256)), [104, 195, 256, 105, 257, 300, 0xf0, 0x9f]]
  id_sequences += [rng.integers(0, 384, rng.integers(0, 30)).tolist() for _ in range(200)]
  _assert_same_tokenizer(ours, theirs, TEXTS + _random_texts(0, 200), id_sequences)


@pytest.mark.slow  # the fixture trains and exports a run: about a minute on 2 CPUs
def test_transformers_computes_the_runs_logits_and_from_hf_keeps_float32(exported):
  workdir, out = exported
  cfg, params, tokenizer, _ = load.open_run(str(workdir))
  tokens_BxT = np.array([tokenizer.encode(ht.english_like_text(64, seed=9)[:48])])
  expected = Transformer(cfg).apply({'params': params}, tokens_BxT)
  model = transformers.AutoModelForCausalLM.from_pretrained(out, attn_implementation='eager')
  with torch.no_grad():
    theirs = model(torch.from_numpy(tokens_BxT)).logits.numpy()
  assert_close(theirs, expected, tol=1e-4)
  back, back_params = diffjax.from_hf(out)  # default settings: the checkpoint's float32, not bfloat16
  assert back.cfg.dtype == 'float32'
  np.testing.assert_allclose(back.apply({'params': back_params}, tokens_BxT), theirs, atol=1e-4, rtol=0)


@pytest.mark.slow  # the fixture trains and exports a run: about a minute on 2 CPUs
@pytest.mark.parametrize('prompt', ['The ', 'Of the', ' '])
def test_greedy_generate_continues_as_diffjax_does(exported, prompt):
  workdir, out = exported
  cfg, params, ours, _ = load.open_run(str(workdir))
  expected = generate.generate(cfg, params, [ours.encode(prompt)], 40, temperature=0.0, eos_id=ours.eos_id).tokens[0]
  theirs = transformers.AutoTokenizer.from_pretrained(out)
  model = transformers.AutoModelForCausalLM.from_pretrained(out, attn_implementation='eager')
  inputs = theirs(prompt, return_tensors='pt')
  with torch.no_grad():
    output = model.generate(**inputs, max_new_tokens=40, do_sample=False)[0, inputs['input_ids'].shape[1]:].tolist()
  if ours.eos_id in output:  # Hugging Face keeps the EOS it stopped at; diffjax leaves it out
    output = output[:output.index(ours.eos_id)]
  assert len(expected) > 0 and output == expected
  assert theirs.decode(output, skip_special_tokens=True) == ours.decode(expected)


def test_a_sentencepiece_vocabulary_exports_exactly(tmp_path):
  texts = [ht.english_like_text(30_000, seed=i) for i in range(3)]
  # Every character of the special tokens' spellings is in the vocabulary, so they spell out as text (see
  # hf_tokenizer's docstring); the accents, CJK and emoji of TEXTS are not, and go through byte fallback.
  texts.append('def main(argv):\n  """<eos> <pad> </s> <unk> [x] {y} (z)"""\n\treturn {"a": 1, "b": [2, 3]}  # '
               '<0x41> 0123456789 // see a/b/c/d.txt\n' * 200)
  ours = tokenizers.SentencePieceTokenizer.train(texts, vocab_size=600)
  special_ids = {'bos_token_id': ours.eos_id, 'eos_token_id': ours.eos_id, 'pad_token_id': ours.pad_id}
  assert hf_tokenizer.save_tokenizer(ours, str(tmp_path), 8192) == special_ids
  theirs = transformers.AutoTokenizer.from_pretrained(tmp_path)
  assert (theirs.eos_token_id, theirs.pad_token_id, len(theirs)) == (ours.eos_id, ours.pad_id, ours.vocab_size)
  # Decoding: encoded texts (their byte pieces spell whole characters) joined by control ids, and random learned
  # pieces mixed with control ids. (A run of byte pieces that is not valid UTF-8 becomes one U+FFFD per byte in
  # Hugging Face's byte-fallback decoder, where SentencePiece replaces only the invalid bytes: not compared.)
  rng = np.random.default_rng(1)
  controls, learned = [ours.eos_id, ours.pad_id], range(tokenizers.SP_MIN_VOCAB_SIZE, ours.vocab_size)
  encoded = [ours.encode(text) for text in _random_texts(1, 100)]
  id_sequences = [[*a, int(rng.choice(controls)), *b] for a, b in zip(encoded[::2], encoded[1::2])]
  id_sequences += [[int(i) for i in rng.choice([*controls, *learned], 12)] for _ in range(100)]
  _assert_same_tokenizer(ours, theirs, TEXTS + _random_texts(2, 300) + [texts[0][:5000]], id_sequences)


def test_a_tokenizer_must_fit_the_model(tmp_path):
  cfg = ht.tiny_model(vocab_size=128)
  with pytest.raises(ConfigError, match=r"^tokenizer: its 258 tokens do not fit the model's vocab_size of 128"):
    diffjax.to_hf(cfg, ht.random_params(cfg), tmp_path, tokenizers.ByteTokenizer())
