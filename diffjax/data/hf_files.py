"""Hugging Face `datasets` files on local disk, read as documents: one document per row of a text column.

Parquet files (FineWeb's shards, any dataset downloaded from the Hub) are read a row group at a time with pyarrow,
which `datasets` installs, rather than through `load_dataset('parquet', ...)`: that first rewrites the whole corpus
as uncompressed Arrow into its cache, doubling the disk a large corpus takes. Arrow files (the shards of a
`Dataset.save_to_disk` folder) are memory-mapped by `datasets.Dataset.from_file`. Opening a file reads its schema and
row counts only, so a wrong column is refused before any text is read.
"""

import bisect
import importlib.util
import itertools

from diffjax.errors import ConfigError, first_line

SUFFIXES = ('.parquet', '.arrow')
INSTALL = "pip install 'diffjax[hf-data]'"
# Rows of an Arrow file read at a time: the file is memory-mapped, so a block costs only its strings in Python.
_ARROW_BLOCK_ROWS = 1024


def check_installed() -> None:
  """Raises ConfigError unless `datasets` can be imported; imports nothing (importing it takes seconds)."""
  if importlib.util.find_spec('datasets') is None:
    raise ConfigError(f'data.source=hf needs the datasets package, which is not installed: {INSTALL}')


class TextColumn:
  """One file's text column: its row count from the file's metadata, and its rows read a block at a time."""

  def __init__(self, path: str, field: str):
    self.path, self._field = path, field
    self._parquet = self._arrow = None
    try:
      if path.endswith('.parquet'):
        import pyarrow.parquet as pq
        self._parquet = pq.ParquetFile(path)
        schema, metadata = self._parquet.schema_arrow, self._parquet.metadata
        sizes = [metadata.row_group(i).num_rows for i in range(metadata.num_row_groups)]
      else:
        import datasets
        self._arrow = datasets.Dataset.from_file(path)
        schema, num_rows = self._arrow.data.schema, self._arrow.num_rows
        sizes = [min(_ARROW_BLOCK_ROWS, num_rows - start) for start in range(0, num_rows, _ARROW_BLOCK_ROWS)]
    except Exception as e:  # pyarrow raises ArrowInvalid, OSError and more for a damaged or foreign file
      kind = 'a Parquet' if path.endswith('.parquet') else 'an Arrow (datasets)'
      raise ConfigError(f'data.hf_files: {path} is not {kind} file that can be read ({first_line(e)}); remove it '
                        'or narrow data.hf_files') from e
    _check_text_field(path, schema, field)
    if self._arrow is not None:
      self._arrow = self._arrow.select_columns([field])  # a block then formats this column alone
    self.num_rows = sum(sizes)
    self.block_starts = list(itertools.accumulate(sizes, initial=0))[:-1]

  def block(self, index: int) -> list[str]:
    """The texts of block `index` (a Parquet row group, or _ARROW_BLOCK_ROWS rows of an Arrow file); a null is ''."""
    if self._parquet is not None:
      texts = self._parquet.read_row_group(index, columns=[self._field]).column(0).to_pylist()
    else:
      start = self.block_starts[index]
      texts = self._arrow[start:start + _ARROW_BLOCK_ROWS][self._field]
    return [text or '' for text in texts]


class Rows:
  """The rows of several files numbered one after the other, read a block at a time.

  Reading rows in order reads each block once; the last block read is kept, so the two splits' passes over the
  files cost two reads of each block and no more memory than one.
  """

  def __init__(self, columns: list[TextColumn]):
    self._columns = columns
    self._starts = list(itertools.accumulate((column.num_rows for column in columns), initial=0))
    self.num_rows = self._starts[-1]
    self._cached = (None, None, [])  # (file, block, texts)

  def text(self, row: int) -> str:
    file = bisect.bisect_right(self._starts, row) - 1
    column, row_in_file = self._columns[file], row - self._starts[file]
    block = bisect.bisect_right(column.block_starts, row_in_file) - 1
    if self._cached[:2] != (file, block):
      self._cached = (file, block, column.block(block))
    return self._cached[2][row_in_file - column.block_starts[block]]


def _check_text_field(path: str, schema, field: str) -> None:
  import pyarrow as pa
  text_types = [pa.types.is_string, pa.types.is_large_string, getattr(pa.types, 'is_string_view', lambda _: False)]
  is_text = lambda name: any(is_type(schema.field(name).type) for is_type in text_types)
  texts = [name for name in schema.names if is_text(name)]
  # 'text' is the usual name (FineWeb, C4, The Pile); otherwise the first text column.
  advice = (f'set data.hf_text_field={"text" if "text" in texts else texts[0]}' if texts
            else 'the file has no text column to train on')
  if field not in schema.names:
    raise ConfigError(f'data.hf_text_field: {path} has no column {field!r} (columns: {", ".join(schema.names)}); '
                      f'{advice}')
  if not is_text(field):
    raise ConfigError(f'data.hf_text_field: column {field!r} of {path} holds {schema.field(field).type}, not text; '
                      f'{advice}')
