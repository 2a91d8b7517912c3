"""Whole models <-> Hugging Face `DiffLlamaForCausalLM` (diff_v1) and `LlamaForCausalLM` (baseline).

`to_hf` and `from_hf` work on plain dicts (a config dict, a state_dict of float32 NumPy arrays) and need neither
torch nor transformers; `save_hf`/`load_hf` write and read a Hugging Face model directory, `save_run`/`import_run` go
between such a directory and a training run, and `hf_model`/`from_hf_model` between the dicts and a live model.

The two frameworks compute the same function with differently ordered channels:
  - DIFF V1 sub-heads: diffjax stores (q1, q2) of differential head h as adjacent heads 2h, 2h+1 (and k1, k2 of
    kv group g as 2g, 2g+1); DiffLlama takes q1 from the first half of its heads and q2 from the second half
    (head h + N/2), and k1, k2 from kv heads g and g + K/2. So the projection outputs go (H, 2, d) <-> (2, H, d).
  - DIFF V1 values: diffjax's kv group g owns 2d channels (v_a, v_b); DiffLlama's head h reads the value
    concat(v_head[g], v_head[g + K/2]), so the value projection reorders the same way, (G, 2, d) <-> (2, G, d).
  - RoPE: Hugging Face rotates channel i with i + d/2 (rotate_half), diffjax's 'half' pairing does the same.
    diffjax's 'interleaved' pairing rotates (2i, 2i+1) at the same frequency as Hugging Face's (i, i + d/2);
    reordering each q/k head's channels as (evens, odds) turns one into the other, and q·k is unchanged because
    queries and keys get the same reordering. Values are not rotated and keep their order.
  - DIFF V1's learnable sub-layer norm scale (width 2d, shared by all heads; DiffLlama's norm has none) multiplies
    the out_proj input channel i by scale[i mod 2d], so the export folds it into the out_proj kernel's rows.
  - Flax Dense kernels are (in, out), torch Linear weights (out, in); embeddings are (vocab, width) in both.
"""

import dataclasses
import json
import os
import shutil
from collections.abc import Mapping

import numpy as np

from diffjax.data import hf_tokenizer, tokenizers
from diffjax.errors import ConfigError
from diffjax.model import transformer as model_lib
from diffjax.model.attention import LAMBDA_VECTORS
from diffjax.model.config import DTYPES, PAPER_LAMBDA_INIT, ModelConfig

ARCHITECTURES = {'diff_v1': ('diffllama', 'DiffLlamaForCausalLM'), 'baseline': ('llama', 'LlamaForCausalLM')}
_VARIANT_OF_MODEL_TYPE = {model_type: variant for variant, (model_type, _) in ARCHITECTURES.items()}
# ModelConfig fields a Hugging Face config does not carry; from_hf takes them as keyword arguments.
IMPORT_SETTINGS = ('rope_pairing', 'subln_scale', 'dtype', 'attention_impl', 'remat', 'remat_policy',
                   'scale_residual_init', 'document_mask')
_LINEARS = (('attn', 'q_proj', 'self_attn', 'q_proj'), ('attn', 'k_proj', 'self_attn', 'k_proj'),
            ('attn', 'v_proj', 'self_attn', 'v_proj'), ('attn', 'out_proj', 'self_attn', 'o_proj'),
            ('ffn', 'gate_proj', 'mlp', 'gate_proj'), ('ffn', 'up_proj', 'mlp', 'up_proj'),
            ('ffn', 'down_proj', 'mlp', 'down_proj'))
_NORMS = (('attn_norm', 'input_layernorm'), ('ffn_norm', 'post_attention_layernorm'))


def _swap_channel_blocks(kernel_ExC, a: int, b: int, inner: int):
  """Output channels laid out (..., a, b, inner) -> (..., b, a, inner); the leading blocks keep their order."""
  e, c = kernel_ExC.shape
  return kernel_ExC.reshape(e, c // (a * b * inner), a, b, inner).swapaxes(2, 3).reshape(e, c)


def _reorder_qkv(cfg: ModelConfig, name: str, kernel_ExC, to_hf: bool):
  """A q/k/v kernel's output channels in diffjax's order -> Hugging Face's (to_hf), or back; other kernels stay. The
  reorderings commute: DIFF V1's moves whole heads, the interleaved RoPE pairing's moves channels within each head."""
  swaps = []
  if cfg.variant == 'diff_v1' and name in ('q_proj', 'k_proj', 'v_proj'):
    swaps.append((cfg.n_heads // 2 if name == 'q_proj' else cfg.kv_heads // 2, 2, cfg.head_dim))
  if cfg.rope_pairing == 'interleaved' and name in ('q_proj', 'k_proj'):
    swaps.append((cfg.head_dim // 2, 2, 1))
  for a, b, inner in swaps:
    kernel_ExC = _swap_channel_blocks(kernel_ExC, *((a, b) if to_hf else (b, a)), inner)
  return kernel_ExC


def hf_config(cfg: ModelConfig) -> dict:
  """The Hugging Face config dict of the model `cfg` describes; refuses what no Hugging Face class computes."""
  if cfg.variant not in ARCHITECTURES:
    raise ConfigError(f'model.variant: {cfg.variant!r} has no Hugging Face class; export diff_v1 (DiffLlama) or '
                      'baseline (Llama)')
  if cfg.variant == 'diff_v1' and not cfg.diff_head_norm:
    raise ConfigError('model.diff_head_norm: False has no Hugging Face class (DiffLlama always applies the per-head '
                      'norm and its (1 - λ_init) scale); export a model trained with diff_head_norm=True')
  if cfg.variant == 'diff_v1' and cfg.lambda_init_schedule != PAPER_LAMBDA_INIT:
    raise ConfigError(f'model.lambda_init: the λ_init schedule {cfg.lambda_init_schedule} has no Hugging Face class '
                      f'(DiffLlama fixes the paper\'s {PAPER_LAMBDA_INIT}); export a model trained with the defaults')
  model_type, architecture = ARCHITECTURES[cfg.variant]
  return {'model_type': model_type, 'architectures': [architecture], 'vocab_size': cfg.vocab_size,
          'hidden_size': cfg.d_model, 'intermediate_size': cfg.d_ff, 'num_hidden_layers': cfg.n_layers,
          'num_attention_heads': cfg.n_heads, 'num_key_value_heads': cfg.kv_heads, 'head_dim': cfg.head_dim,
          'hidden_act': 'silu', 'max_position_embeddings': cfg.max_len, 'rms_norm_eps': cfg.norm_eps,
          'rope_theta': cfg.rope_theta, 'tie_word_embeddings': cfg.tie_embeddings, 'attention_bias': False,
          'mlp_bias': False, 'attention_dropout': 0.0}


def hf_keys(cfg: ModelConfig) -> list[str]:
  """The names of the Hugging Face model's state_dict, in the order to_hf writes them."""
  keys = ['model.embed_tokens.weight', 'model.norm.weight', 'lm_head.weight']
  for layer in range(cfg.n_layers):
    prefix = f'model.layers.{layer}.'
    keys += [f'{prefix}{module}.{name}.weight' for _, _, module, name in _LINEARS]
    keys += [f'{prefix}{name}.weight' for _, name in _NORMS]
    if cfg.variant == 'diff_v1':
      keys += [f'{prefix}self_attn.{n}' for n in LAMBDA_VECTORS]
  return keys


def to_hf(cfg: ModelConfig, params: Mapping) -> tuple[dict, dict[str, np.ndarray]]:
  """(cfg, the model's unboxed `params` collection) -> (Hugging Face config dict, state_dict of float32 arrays).

  The state_dict has the keys of the Hugging Face model's own `state_dict()`, `lm_head.weight` included when the
  embeddings are tied (the embedding matrix then), so `load_state_dict(strict=True)` accepts it.
  """
  cfg, params = model_lib.unscanned(cfg, params)
  config = hf_config(cfg)
  array = lambda x: np.array(x, dtype=np.float32)  # a copy: the result shares no memory with `params`
  embedding = array(params['embed']['embedding'])
  lm_head = embedding.copy() if cfg.tie_embeddings else np.ascontiguousarray(array(params['lm_head']['kernel']).T)
  state_dict = {'model.embed_tokens.weight': embedding, 'model.norm.weight': array(params['final_norm']['scale']),
                'lm_head.weight': lm_head}
  for layer in range(cfg.n_layers):
    block, prefix = params[f'block_{layer}'], f'model.layers.{layer}.'
    for ours, ours_name, theirs, theirs_name in _LINEARS:
      kernel_ExC = _reorder_qkv(cfg, ours_name, array(block[ours][ours_name]['kernel']), to_hf=True)
      if ours_name == 'out_proj' and cfg.variant == 'diff_v1' and cfg.subln_scale:
        # The sub-layer norm's output channel i (of heads × 2d) is scaled by scale[i mod 2d] just before out_proj.
        kernel_ExC = kernel_ExC * np.tile(array(block['attn']['subln']['scale']), cfg.n_heads // 2)[:, None]
      state_dict[f'{prefix}{theirs}.{theirs_name}.weight'] = np.ascontiguousarray(kernel_ExC.T)
    for ours, theirs in _NORMS:
      state_dict[f'{prefix}{theirs}.weight'] = array(block[ours]['scale'])
    if cfg.variant == 'diff_v1':
      state_dict.update({f'{prefix}self_attn.{n}': array(block['attn'][n]) for n in LAMBDA_VECTORS})
  return config, state_dict


def _model_config(config: Mapping, settings: Mapping) -> ModelConfig:
  unknown = sorted(set(settings) - set(IMPORT_SETTINGS))
  if unknown:
    raise ConfigError(f'from_hf: {unknown[0]} comes from the Hugging Face config; settings are only '
                      f'{", ".join(IMPORT_SETTINGS)}')
  variant = _VARIANT_OF_MODEL_TYPE.get(config.get('model_type'))
  if variant is None:
    raise ConfigError(f'config.model_type: {config.get("model_type")!r} is not supported; use diffllama or llama')
  heads = config['num_attention_heads']
  # transformers 5 keeps θ and the RoPE type in rope_parameters; 4.x in rope_theta and rope_scaling.
  rope = config.get('rope_parameters') or config.get('rope_scaling') or {}
  unsupported = [(key, value) for key, value, ok in (
      ('hidden_act', config.get('hidden_act', 'silu'), lambda v: v == 'silu'),
      ('attention_bias', config.get('attention_bias', False), lambda v: not v),
      ('mlp_bias', config.get('mlp_bias', False), lambda v: not v),
      ('rope_type', rope.get('rope_type', rope.get('type', 'default')), lambda v: v == 'default'),
      ('head_dim', config.get('head_dim'), lambda v: v in (None, config['hidden_size'] // heads)),
  ) if not ok(value)]
  if unsupported:
    key, value = unsupported[0]
    raise ConfigError(f'config.{key}: {value!r} has no diffjax equivalent')
  kv_heads = config.get('num_key_value_heads') or heads
  values = dict(variant=variant, vocab_size=config['vocab_size'], d_model=config['hidden_size'],
                n_layers=config['num_hidden_layers'], n_heads=heads, n_kv_heads=None if kv_heads == heads else kv_heads,
                d_ff=config['intermediate_size'], max_len=config['max_position_embeddings'],
                rope_theta=float(rope.get('rope_theta', config.get('rope_theta', 10000.0))),
                norm_eps=float(config['rms_norm_eps']), tie_embeddings=bool(config.get('tie_word_embeddings', False)),
                rope_pairing='half', subln_scale=False,
                dtype=settings.get('dtype') or _checkpoint_dtype(config))
  return ModelConfig(**{**values, **settings}).validated()


def _checkpoint_dtype(config: Mapping) -> str:
  """The dtype the checkpoint declares (transformers 5 writes `dtype`, 4.x `torch_dtype`; float32 when absent), as
  Hugging Face's loaders compute in it: diffjax's bfloat16 default would move the logits away from the original."""
  key = 'dtype' if config.get('dtype') is not None else 'torch_dtype'
  dtype = str(config.get(key) or 'float32').removeprefix('torch.')
  if dtype not in DTYPES:
    raise ConfigError(f'config.{key}: {dtype!r} is no diffjax compute dtype; pass dtype= one of {", ".join(DTYPES)}')
  return dtype


def from_hf(config: Mapping, state_dict: Mapping, **settings) -> tuple[ModelConfig, dict]:
  """(Hugging Face config dict, state_dict) -> (ModelConfig, unboxed float32 `params` collection).

  `settings` sets ModelConfig fields the Hugging Face config does not carry (IMPORT_SETTINGS). By default the model
  computes in the checkpoint's dtype (float32 when it names none), with rope_pairing='half' (Hugging Face's own) and
  subln_scale=False (DiffLlama has none); rope_pairing='interleaved' reorders q/k channels instead, and
  subln_scale=True adds scales of ones (a model exported with a learned scale comes back as the same function).
  """
  cfg = _model_config(config, settings)
  expected = set(hf_keys(cfg))
  missing, extra = sorted(expected - set(state_dict)), sorted(set(state_dict) - expected)
  if cfg.tie_embeddings and missing == ['lm_head.weight']:
    missing = []  # saved checkpoints of tied models leave the duplicate out
  if missing or extra:
    raise ConfigError(f'state_dict: {"missing " + missing[0] if missing else "unexpected " + extra[0]} for a '
                      f'{config["model_type"]} model of {cfg.n_layers} layers')
  array = lambda key: np.array(state_dict[key], dtype=np.float32)  # a copy, as in to_hf
  params = {'embed': {'embedding': array('model.embed_tokens.weight')},
            'final_norm': {'scale': array('model.norm.weight')}}
  if not cfg.tie_embeddings:
    params['lm_head'] = {'kernel': np.ascontiguousarray(array('lm_head.weight').T)}
  elif 'lm_head.weight' in state_dict and not np.array_equal(array('lm_head.weight'), params['embed']['embedding']):
    raise ConfigError('config.tie_word_embeddings: True, but lm_head.weight differs from model.embed_tokens.weight')
  for layer in range(cfg.n_layers):
    prefix = f'model.layers.{layer}.'
    block = {'attn': {}, 'ffn': {}}
    for ours, ours_name, theirs, theirs_name in _LINEARS:
      kernel_ExC = np.ascontiguousarray(array(f'{prefix}{theirs}.{theirs_name}.weight').T)
      block[ours][ours_name] = {'kernel': _reorder_qkv(cfg, ours_name, kernel_ExC, to_hf=False)}
    for ours, theirs in _NORMS:
      block[ours] = {'scale': array(f'{prefix}{theirs}.weight')}
    if cfg.variant == 'diff_v1':
      block['attn'].update({n: array(f'{prefix}self_attn.{n}') for n in LAMBDA_VECTORS})
      if cfg.subln_scale:
        block['attn']['subln'] = {'scale': np.ones(2 * cfg.head_dim, np.float32)}
    params[f'block_{layer}'] = block
  return cfg, params


def hf_model(cfg: ModelConfig, params: Mapping | None = None, attn_implementation: str = 'eager'):
  """A PyTorch Hugging Face model (float32, torch's default dtype) holding `params`, or without them Hugging Face's
  own initial weights; needs torch and transformers."""
  import torch  # pylint: disable=import-outside-toplevel
  import transformers  # pylint: disable=import-outside-toplevel
  config, state_dict = (hf_config(cfg), None) if params is None else to_hf(cfg, params)
  model = transformers.AutoModelForCausalLM.from_config(transformers.AutoConfig.for_model(**config),
                                                        attn_implementation=attn_implementation)
  if state_dict is not None:
    model.load_state_dict({k: torch.from_numpy(v) for k, v in state_dict.items()}, strict=True)
  return model


def decay_groups(model, weight_decay: float) -> list[dict]:
  """torch.optim parameter groups of a Hugging Face model that decay as diffjax decays (`optim.decay_mask`): the
  matrices. Norm scales and DiffLlama's λ vectors are 1-D, and are left alone."""
  params = list(model.parameters())
  return [{'params': [p for p in params if p.ndim >= 2], 'weight_decay': weight_decay},
          {'params': [p for p in params if p.ndim < 2], 'weight_decay': 0.0}]


def from_hf_model(model, **settings) -> tuple[ModelConfig, dict]:
  """from_hf for a live PyTorch Hugging Face model."""
  state_dict = {k: v.detach().float().cpu().numpy() for k, v in model.state_dict().items()}
  return from_hf(model.config.to_dict(), state_dict, **settings)


_CONFIG, _SAFETENSORS, _TORCH_BIN = 'config.json', 'model.safetensors', 'pytorch_model.bin'
_SAFETENSORS_INDEX, _GENERATION_CONFIG = 'model.safetensors.index.json', 'generation_config.json'


def _read_weights(path: str) -> dict:
  """The state_dict in a Hugging Face directory: model.safetensors (or its shards), else pytorch_model.bin."""
  single, index, torch_bin = (os.path.join(path, name) for name in (_SAFETENSORS, _SAFETENSORS_INDEX, _TORCH_BIN))
  if os.path.isfile(single) or os.path.isfile(index):
    try:
      from safetensors.numpy import load_file  # pylint: disable=import-outside-toplevel
    except ImportError:
      raise ConfigError(f'{path}: reading {_SAFETENSORS} needs the safetensors package '
                        '(pip install -e ".[hf]")') from None
    if os.path.isfile(single):
      return load_file(single)
    with open(index, encoding='utf-8') as f:
      shards = sorted(set(json.load(f)['weight_map'].values()))
    return {k: v for shard in shards for k, v in load_file(os.path.join(path, shard)).items()}
  if os.path.isfile(torch_bin):
    try:
      import torch  # pylint: disable=import-outside-toplevel
    except ImportError:
      raise ConfigError(f'{path}: reading {_TORCH_BIN} needs torch (pip install -e ".[hf]")') from None
    state_dict = torch.load(torch_bin, map_location='cpu', weights_only=True)
    return {k: v.detach().float().numpy() for k, v in state_dict.items()}
  raise ConfigError(f'{path}: no {_SAFETENSORS}, {_SAFETENSORS_INDEX} or {_TORCH_BIN} in the directory')


def load_hf(path, **settings) -> tuple[ModelConfig, dict]:
  """from_hf for a Hugging Face model directory (what `save_pretrained` writes): config.json and the weights."""
  path = os.fspath(path)
  config_file = os.path.join(path, _CONFIG)
  if not os.path.isdir(path):
    raise ConfigError(f'{path}: no such directory')
  if not os.path.isfile(config_file):
    raise ConfigError(f'{path}: no {_CONFIG} in the directory')
  with open(config_file, encoding='utf-8') as f:
    config = json.load(f)
  _model_config(config, settings)  # an unsupported model is refused before its weights are read
  return from_hf(config, _read_weights(path), **settings)


def save_hf(cfg: ModelConfig, params: Mapping, path, tokenizer: tokenizers.Tokenizer | None = None) -> str:
  """Writes `to_hf`'s result as a directory `transformers.AutoModelForCausalLM.from_pretrained` loads: config.json
  (float32) and model.safetensors (through the safetensors package; without it, pytorch_model.bin through torch).
  With the `tokenizer` the model was trained with, also its files for `transformers.AutoTokenizer`, its special-token
  ids in config.json and a generation_config.json that stops at the end-of-document token, so `generate` ends where
  diffjax's does. Returns `path`.
  """
  path = os.fspath(path)
  config, state_dict = to_hf(cfg, params)
  if tokenizer is not None and tokenizer.vocab_size > cfg.vocab_size:
    raise ConfigError(f'tokenizer: its {tokenizer.vocab_size} tokens do not fit the model\'s vocab_size of '
                      f'{cfg.vocab_size}; give the tokenizer the model was trained with')
  if cfg.tie_embeddings:
    del state_dict['lm_head.weight']  # as transformers' own checkpoints do
  try:
    from safetensors.numpy import save_file  # pylint: disable=import-outside-toplevel
  except ImportError:
    save_file = None
    try:
      import torch  # pylint: disable=import-outside-toplevel
    except ImportError:
      raise ConfigError(f'{path}: writing a Hugging Face directory needs safetensors or torch '
                        '(pip install -e ".[hf]")') from None
  os.makedirs(path, exist_ok=True)
  if tokenizer is not None:
    special_ids = hf_tokenizer.save_tokenizer(tokenizer, path, cfg.max_len)
    config.update(special_ids)
    _write_json(os.path.join(path, _GENERATION_CONFIG), special_ids)
  if save_file is not None:
    save_file(state_dict, os.path.join(path, _SAFETENSORS), metadata={'format': 'pt'})
  else:
    torch.save({k: torch.from_numpy(v) for k, v in state_dict.items()}, os.path.join(path, _TORCH_BIN))
  _write_json(os.path.join(path, _CONFIG), {**config, 'torch_dtype': 'float32'})
  return path


def _write_json(file: str, values: dict):
  with open(file, 'w', encoding='utf-8') as f:
    json.dump(values, f, indent=2, sort_keys=True)
    f.write('\n')


def save_run(workdir, path) -> str:
  """save_hf for a training run: the parameters of its newest readable checkpoint, with its tokenizer."""
  from diffjax.infer import load  # pylint: disable=import-outside-toplevel  (Orbax, only for this)
  cfg, params, tokenizer, _ = load.open_run(os.fspath(workdir))
  return save_hf(cfg, params, path, tokenizer)


def import_run(path, workdir, tokenizer: str | None = None) -> str:
  """load_hf into a new run's workdir, which `open_run` reads and `checkpoint.init_from` trains on from: config.json
  (the defaults with the model's keys, its tokenizer's and `train.seq_len` at most `max_len`), the tokenizer
  (WORKDIR/tokenizer.model for SentencePiece) and a step-0 checkpoint of the parameters alone, with checksums.

  `tokenizer`: 'byte' or the path of a SentencePiece model; None takes the one `save_hf` wrote into `path`. The run
  is written beside WORKDIR and renamed into place, so WORKDIR (new or an empty folder) appears only complete.
  Returns WORKDIR.
  """
  from diffjax.data import pipeline  # pylint: disable=import-outside-toplevel  (the run's files, only for this)
  from diffjax.run import checkpoint as checkpoint_lib  # pylint: disable=import-outside-toplevel  (Orbax)
  from diffjax.run import defaults  # pylint: disable=import-outside-toplevel
  path, workdir = os.fspath(path), os.path.abspath(os.fspath(workdir))
  if os.path.isfile(os.path.join(workdir, 'config.json')) or os.path.isdir(os.path.join(workdir, 'checkpoints')):
    raise ConfigError(f'--workdir: {workdir} already holds a run; give a new folder for the imported one')
  if os.path.lexists(workdir) and (not os.path.isdir(workdir) or os.listdir(workdir)):
    raise ConfigError(f'--workdir: {workdir} is not an empty folder; give a new folder for the imported run')
  if not os.path.isdir(path):
    raise ConfigError(f'--hf_dir: {path} is no directory; give the folder that save_pretrained or diffjax export '
                      'wrote')
  cfg, params = load_hf(path)
  vocabulary = _import_tokenizer(path, tokenizer)
  if vocabulary.vocab_size > cfg.vocab_size:
    raise ConfigError(f'--tokenizer: its {vocabulary.vocab_size} tokens do not fit the model\'s vocab_size of '
                      f'{cfg.vocab_size}; give the tokenizer the model was trained with')
  sentencepiece = isinstance(vocabulary, tokenizers.SentencePieceTokenizer)
  config = defaults.base_config()
  config.model.update({**dataclasses.asdict(cfg), 'n_kv_heads': cfg.n_kv_heads or 0})
  config.data.tokenizer = 'sentencepiece' if sentencepiece else 'byte'
  if sentencepiece:
    config.data.sp_vocab_size = vocabulary.vocab_size
  config.train.seq_len = min(config.train.seq_len, cfg.max_len)
  defaults.check_values(config)
  defaults.model_config(config, vocabulary.vocab_size)  # what open_run will build from config.json
  partial = f'{workdir}.partial-{os.getpid()}'
  try:
    os.makedirs(partial)
    _write_json(os.path.join(partial, 'config.json'), config.to_dict())
    if sentencepiece:
      vocabulary.save(os.path.join(partial, pipeline.TOKENIZER_FILE))
    checkpoints = checkpoint_lib.Checkpointer(os.path.join(partial, 'checkpoints'), keep=1, async_save=False)
    try:
      checkpoints.save(0, {'params': params}, {'imported_from': os.path.abspath(path)}, config.to_dict())
      checkpoints.wait()
    finally:
      checkpoints.close()
    os.replace(partial, workdir)  # replaces an empty folder
  except BaseException:
    shutil.rmtree(partial, ignore_errors=True)
    raise
  return workdir


def _import_tokenizer(path: str, name: str | None) -> tokenizers.Tokenizer:
  if name == 'byte':
    return tokenizers.ByteTokenizer()
  if name:
    return tokenizers.SentencePieceTokenizer.load(name, key='--tokenizer', remedy='give byte or the SentencePiece '
                                                  'model the model was trained with (a run keeps it as '
                                                  'WORKDIR/tokenizer.model)')
  found = hf_tokenizer.read_tokenizer(path)
  if found is None:
    raise ConfigError(f'--tokenizer: {path} holds no tokenizer diffjax can use (the byte-level tokenizer.json or '
                      'SentencePiece tokenizer.model that diffjax export writes); pass the one the model was trained '
                      'with: --tokenizer=byte or --tokenizer=PATH of its SentencePiece .model file')
  return found
