"""Writes a training run as a Hugging Face directory: `python -m diffjax.export --workdir=DIR --out=HF_DIR`.

The newest readable checkpoint's parameters, in the DiffLlama or Llama layout that
`transformers.AutoModelForCausalLM.from_pretrained(HF_DIR)` loads, with the run's tokenizer for
`transformers.AutoTokenizer` and a generation config that stops at the end-of-document token (`diffjax.infer.hf`).
Needs safetensors or torch (`pip install -e ".[hf]"`).
"""

from absl import app, flags

from diffjax import cli
from diffjax.errors import ConfigError
from diffjax.infer import hf

WORKDIR = flags.DEFINE_string('workdir', None, 'The workdir of a training run.')
OUT = flags.DEFINE_string('out', None, 'The Hugging Face directory to write.')


@cli.report_errors
def main(argv):
  del argv
  if not WORKDIR.value or not OUT.value:
    raise ConfigError('--workdir and --out are required, e.g. --workdir=runs/tiny --out=runs/tiny_hf')
  print(hf.save_run(WORKDIR.value, OUT.value))


if __name__ == '__main__':
  app.run(main, flags_parser=cli.parse_flags)
