"""TFDS builders for text on local disk: one example per document file, split by document.

`LocalText` reads `.txt` / `.txt.gz` files named by a folder, a file or a glob; `PythonStdlib` reads the
`.py` sources of the running Python's standard library, a default corpus present on every machine.
Each corpus gets its own BuilderConfig, named by a hash of its files, so different corpora (or an edited
one) never share prepared data in a TFDS data_dir.
"""

import dataclasses
import glob
import gzip
import hashlib
import os
import re
import sys
import sysconfig

import tensorflow_datasets as tfds

from diffjax.errors import ConfigError

TRAIN_SPLIT = 'train'
VALIDATION_SPLIT = 'validation'
# Random-access files, which Grain reads by index; TFDS writes them without TensorFlow.
FILE_FORMAT = 'array_record'

_TEXT_SUFFIXES = ('.txt', '.txt.gz')
_UTF8_BOM = b'\xef\xbb\xbf'
# Tests and vendored packages would dominate the standard library's text and slow its preparation.
_STDLIB_SKIPPED_FOLDERS = frozenset({'site-packages', 'dist-packages', 'test', 'tests', 'idle_test'})


@dataclasses.dataclass(eq=False)
class DocumentFilesConfig(tfds.core.BuilderConfig):
  """A fixed list of document files, named relative to `root`, and the share kept for validation."""

  root: str = ''
  files: tuple[str, ...] = dataclasses.field(default=(), repr=False)
  validation_fraction: float = 0.05


class _DocumentFilesBuilder(tfds.core.GeneratorBasedBuilder, skip_registration=True):
  """Writes each file of the config as one example {'text', 'name'} into the train or validation split."""

  VERSION = tfds.core.Version('1.0.0')
  RELEASE_NOTES = {'1.0.0': 'One example per document; UTF-8, BOM stripped, CRLF turned into LF.'}
  # Nothing is downloaded. Looking for URL checksums next to the code makes TFDS 4.9 import the
  # `importlib_resources` backport, which Python >= 3.9 installs lack.
  url_infos = None

  def _info(self) -> tfds.core.DatasetInfo:
    return tfds.core.DatasetInfo(
        builder=self,
        description=self.builder_config.description,
        features=tfds.features.FeaturesDict({'text': tfds.features.Text(), 'name': tfds.features.Text()}),
    )

  def _split_generators(self, dl_manager):
    del dl_manager  # Everything is on local disk.
    config = self.builder_config
    documents = {os.path.relpath(path, config.root): path for path in config.files}
    validation = validation_documents(list(documents), config.validation_fraction)
    return {
        TRAIN_SPLIT: self._generate_examples(
            {name: path for name, path in documents.items() if name not in validation}),
        VALIDATION_SPLIT: self._generate_examples(
            {name: path for name, path in documents.items() if name in validation}),
    }

  def _generate_examples(self, documents: dict[str, str]):
    for name, path in documents.items():
      yield name, {'text': read_document(path), 'name': name}


class LocalText(_DocumentFilesBuilder, skip_registration=True):
  """Local `.txt` and `.txt.gz` files; build one with `local_text`."""


class PythonStdlib(_DocumentFilesBuilder, skip_registration=True):
  """The `.py` files of Python's standard library, without tests; build one with `python_stdlib`."""


def local_text(text_glob: str, *, validation_fraction: float, data_dir: str | None) -> LocalText:
  """The LocalText builder for the files that `text_glob` names (ConfigError if there are none)."""
  files = [path for path in find_text_files(text_glob) if not _is_empty(path)]
  if not files:
    raise ConfigError(f'data.text_glob: every file matching {text_glob!r} is empty; point it at text files '
                      'with content')
  if len(files) < 2:
    raise ConfigError(f'data.text_glob: only one non-empty document matches {text_glob!r}; documents go whole '
                      'to train or validation, so point it at two or more files')
  root = os.path.commonpath([os.path.dirname(path) for path in files])
  # The folder's name keeps prepared corpora recognisable when listing the data_dir.
  slug = re.sub(r'[^a-z0-9]+', '_', os.path.basename(root).lower()).strip('_') or 'text'
  config = DocumentFilesConfig(
      name=_config_name(slug, files, validation_fraction),
      description=f'Text files matching {text_glob!r}, one example per file.',
      root=root,
      files=tuple(files),
      validation_fraction=validation_fraction,
  )
  return LocalText(config=config, data_dir=data_dir)


def python_stdlib(*, validation_fraction: float, data_dir: str | None) -> PythonStdlib:
  """The PythonStdlib builder for the standard library of the running interpreter."""
  root = sysconfig.get_paths()['stdlib']
  files = [path for path in stdlib_source_files(root) if os.path.getsize(path) > 0]
  version = f'py{sys.version_info.major}{sys.version_info.minor}'
  config = DocumentFilesConfig(
      name=_config_name(version, files, validation_fraction),
      description=f'Python {sys.version.split()[0]} standard library sources under {root}, one example per file.',
      root=root,
      files=tuple(files),
      validation_fraction=validation_fraction,
  )
  return PythonStdlib(config=config, data_dir=data_dir)


def prepare(builder: tfds.core.DatasetBuilder) -> tfds.core.DatasetBuilder:
  """Writes the builder's ArrayRecord files unless its data_dir already holds them; returns the builder."""
  if not builder.is_prepared():
    builder.download_and_prepare(file_format=FILE_FORMAT)
  return builder


def check_text_glob(text_glob: str) -> None:
  """Raises ConfigError if `text_glob`, or the folder a glob searches, does not exist; reads no files."""
  pattern = os.path.expanduser(text_glob)
  if _is_glob(pattern):
    parts = pattern.split(os.sep)
    fixed = parts[:next(i for i, part in enumerate(parts) if _is_glob(part))]
    folder = os.sep.join(fixed) or os.curdir
    if not os.path.isdir(folder):
      raise ConfigError(f'data.text_glob: the folder {folder!r} of {text_glob!r} does not exist; point it at a '
                        'folder, file or glob of .txt or .txt.gz files')
  elif not os.path.exists(pattern):
    raise ConfigError(f'data.text_glob: {text_glob!r} does not exist; point it at a folder, file or glob of '
                      '.txt or .txt.gz files')


def find_text_files(text_glob: str) -> list[str]:
  """Sorted `.txt` / `.txt.gz` files in a folder (recursively), a single file, or matching a glob."""
  check_text_glob(text_glob)
  pattern = os.path.expanduser(text_glob)
  if _is_glob(pattern):
    candidates = glob.glob(pattern, recursive=True)
  elif os.path.isdir(pattern):
    candidates = [os.path.join(folder, name) for folder, _, names in os.walk(pattern) for name in names]
  else:
    candidates = [pattern]
  files = sorted(os.path.abspath(path) for path in candidates
                 if path.endswith(_TEXT_SUFFIXES) and os.path.isfile(path))
  if not files:
    raise ConfigError(f'data.text_glob: no .txt or .txt.gz files match {text_glob!r}; point it at a folder or '
                      'glob of text files')
  return files


def stdlib_source_files(root: str) -> list[str]:
  """Sorted `.py` files under the standard library folder `root`, skipping tests and installed packages."""
  files = []
  for folder, subfolders, names in os.walk(root):
    subfolders[:] = [name for name in subfolders if name not in _STDLIB_SKIPPED_FOLDERS]
    files.extend(os.path.join(folder, name) for name in names if name.endswith('.py'))
  return sorted(files)


def read_document(path: str) -> str:
  """The text of a file: gunzipped if `.gz`, UTF-8 without BOM, with LF line ends."""
  opener = gzip.open if path.endswith('.gz') else open
  with opener(path, 'rb') as f:
    data = f.read()
  # A stray invalid byte should not stop preparing a whole corpus; it becomes U+FFFD.
  return data.decode('utf-8-sig', errors='replace').replace('\r\n', '\n')


def validation_documents(names: list[str], validation_fraction: float) -> set[str]:
  """The names that go to validation: chosen by a hash of the name, so stable as files come and go.

  With two or more documents, each split gets at least one.
  """
  score = {name: int.from_bytes(hashlib.sha256(name.encode('utf-8')).digest()[:8], 'big') / 2**64
           for name in names}
  chosen = {name for name in names if score[name] < validation_fraction}
  if len(names) >= 2:
    if not chosen:
      chosen = {min(names, key=score.__getitem__)}
    elif len(chosen) == len(names):
      chosen.remove(max(names, key=score.__getitem__))
  return chosen


def _is_glob(pattern: str) -> bool:
  return any(wildcard in pattern for wildcard in '*?[')


def _is_empty(path: str) -> bool:
  opener = gzip.open if path.endswith('.gz') else open
  with opener(path, 'rb') as f:
    head = f.read(len(_UTF8_BOM) + 1)
  return head in (b'', _UTF8_BOM)


def _config_name(prefix: str, files: list[str], validation_fraction: float) -> str:
  """`prefix_<hash>` of the files' paths, sizes and modification times and the split fraction."""
  digest = hashlib.sha256(f'validation_fraction={validation_fraction!r}\n'.encode())
  for path in files:
    stat = os.stat(path)
    digest.update(f'{path}\t{stat.st_size}\t{stat.st_mtime_ns}\n'.encode())
  return f'{prefix}_{digest.hexdigest()[:16]}'
