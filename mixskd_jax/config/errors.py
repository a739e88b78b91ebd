"""The errors that stop a run before it starts. Each message is one line that says what is
wrong and what to do; `python -m mixskd_jax.main` prints it without a traceback and exits with
status 2. They live at the bottom of the package so that every layer can raise them."""


class PreflightError(Exception):
  """A run cannot start; the message is one line that says why and what to do."""


class ConfigFieldError(PreflightError, ValueError):
  """The config has a field the trainer does not know."""


class ConfigValueError(PreflightError, ValueError):
  """A config field holds a value of the wrong type or out of its range, or fields break a
  rule between them. The message is one line: the dotted field, the value, what is allowed
  and what to set."""


class DataFaultError(PreflightError, ValueError):
  """Data on disk is damaged or half-written: an IDX file cut short or not IDX at all, a
  prepared tfds dataset whose files no longer match what was written, a record that cannot be
  read. The message is one line: the file or folder, what is wrong, and what to do (reinstall
  the package, delete the prepared folder so that it is rebuilt, point a field elsewhere).
  Found before training, the run does not start; found while training, the run first saves its
  state at the last completed step, so that the same command resumes once the data is
  repaired. (A ValueError too: the IDX readers raised ValueError before.)"""
