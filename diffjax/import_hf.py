"""Makes a Hugging Face checkpoint a diffjax run: `python -m diffjax.import_hf --hf_dir=HF_DIR --workdir=DIR`.

The reverse of `diffjax export`: a DiffLlama or Llama directory (config.json and safetensors, as `save_pretrained`
or `diffjax export` writes it) becomes a run's workdir that `diffjax sample`, `evaluate` and `export` open, holding
config.json, the tokenizer and a checkpoint of the parameters (`diffjax.infer.hf.import_run`). To train on from it,
start a new workdir with its config and parameters:
`diffjax train --config=configs/run.py:DIR --workdir=NEW --config.checkpoint.init_from=DIR`.
The tokenizer is the one diffjax's export wrote into HF_DIR; for any other, --tokenizer names it.
Needs safetensors or torch (`pip install -e ".[hf]"`).
"""

from absl import app, flags

from diffjax import cli
from diffjax.errors import ConfigError
from diffjax.infer import hf
from diffjax.train import workdir as workdir_lib

HF_DIR = flags.DEFINE_string('hf_dir', None, 'The Hugging Face directory to import.')
WORKDIR = flags.DEFINE_string('workdir', None, 'The new run\'s workdir: a folder that does not exist yet, or is empty.')
TOKENIZER = flags.DEFINE_string('tokenizer', None, 'byte, or the SentencePiece .model file the model was trained '
                                'with; unset: the one diffjax export wrote into --hf_dir.')


@cli.report_errors
def main(argv):
  del argv
  if not HF_DIR.value or not WORKDIR.value:
    raise ConfigError('--hf_dir and --workdir are required, e.g. --hf_dir=runs/tiny_hf --workdir=runs/tiny_imported')
  workdir_lib.check_local(WORKDIR.value, '--workdir')
  with cli.writing(WORKDIR.value, '--workdir'):
    print(hf.import_run(HF_DIR.value, WORKDIR.value, TOKENIZER.value))


if __name__ == '__main__':
  app.run(main, flags_parser=cli.parse_flags)
