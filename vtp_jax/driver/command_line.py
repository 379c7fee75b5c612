"""The training command line's flags, parsed so that a user's mistake is one line and exit status 2:
a config file that does not exist or does not load, a `--config.KEY=VALUE` override whose key the
config does not have (with the closest keys it does have) or whose value does not parse.
Tracebacks stay for the project's own faults.
"""

import difflib
import os
import re
import sys

import ml_collections

EXIT_CONFIG = 2  # launch/main.py: a config that cannot run


class ConfigMistake(ValueError):
  """A command line the config cannot take; the message is the one line users see."""


def _config_arg(argv) -> str | None:
  for i, arg in enumerate(argv):
    if arg.startswith('--config='):
      return arg.split('=', 1)[1]
    if arg == '--config' and i + 1 < len(argv):
      return argv[i + 1]
  return None


def _overrides(argv) -> list[tuple[str, str | None]]:
  """(key, value) of every `--config.KEY=VALUE` (or `--config.KEY VALUE`) on the command line."""
  out = []
  for i, arg in enumerate(argv):
    m = re.fullmatch(r'--config\.([^=]+)(?:=(.*))?', arg, re.S)
    if m:
      value = m.group(2)
      if value is None and i + 1 < len(argv) and not argv[i + 1].startswith('--'):
        value = argv[i + 1]
      out.append((m.group(1), value))
  return out


def known_keys(config) -> list[str]:
  """Every leaf key of `config`, dot-joined ('train.steps', 'model.encoder.width', ...)."""
  keys = []
  for key, value in config.items():
    if isinstance(value, ml_collections.ConfigDict):
      keys += [f'{key}.{sub}' for sub in known_keys(value)]
    else:
      keys.append(key)
  return keys


def _has_key(config, dotted: str) -> bool:
  node = config
  for part in dotted.split('.'):
    if not isinstance(node, ml_collections.ConfigDict) or part not in node:
      return False
    node = node[part]
  return True


def _file_config(config_file: str):
  """The config `--config=FILE[:ARG]` names, loaded as config_flags loads it (get_config(ARG))."""
  import importlib.util
  path, _, arg = config_file.partition(':')
  spec = importlib.util.spec_from_file_location('_command_line_config', path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config(arg) if arg else module.get_config()


def _unknown_key_line(key: str, config) -> str:
  close = difflib.get_close_matches(key, known_keys(config), n=3, cutoff=0.5)
  hint = f'did you mean {", ".join(close)}? ' if close else ''
  return (f'--config.{key}: the config has no key {key!r}; {hint}configs/base.py lists every key '
          'with a comment.')


def diagnose(argv, error: BaseException) -> str:
  """The one line for a command line whose flags did not parse (`error` is what parsing raised)."""
  config_file = _config_arg(argv)
  if config_file is None:
    return '--config is required, e.g. --config=configs/vtp_tiny.py.'
  path = config_file.split(':', 1)[0]
  if not os.path.exists(path):
    shipped = sorted(f'configs/{f}' for f in os.listdir('configs')
                     if f.endswith('.py') and f != '__init__.py') if os.path.isdir('configs') else []
    close = difflib.get_close_matches(path, shipped, n=3, cutoff=0.8)
    hint = f'did you mean {", ".join(close)}? ' if close else ''
    return (f'--config={config_file}: no such config file; {hint}the shipped configs are '
            'configs/*.py (e.g. configs/vtp_tiny.py).')
  text = str(error).strip()
  if 'Failed loading config file' in text or 'earlier failure to load' in text:
    detail = [line.strip() for line in text.splitlines() if line.strip()][-1]
    return f'--config={config_file}: the config file does not load ({detail[:200]}).'
  config = _file_config(config_file)
  for key, value in _overrides(argv):
    if not _has_key(config, key):
      return _unknown_key_line(key, config)
  for key, value in _overrides(argv):
    if key in text or (value is not None and value in text):
      first = text.splitlines()[0] if text else type(error).__name__
      return f'--config.{key}={value}: {first[:200]}; give a value of the key\'s type.'
  first = text.splitlines()[0] if text else type(error).__name__
  return f'the command line does not parse ({type(error).__name__}: {first[:200]}).'


def parse_or_exit(argv, parse, load):
  """`parse(argv)` (absl's flag parsing) and `load()` (the config, which config_flags loads
  lazily), or the one-line diagnosis on stderr and exit status 2."""
  try:
    rest = parse(argv)
    load()
    return rest
  except SystemExit:
    raise
  except Exception as e:  # noqa: BLE001: every parse failure is a mistake in the command line
    print(f'error: {diagnose(argv, e)}', file=sys.stderr)
    sys.exit(EXIT_CONFIG)
