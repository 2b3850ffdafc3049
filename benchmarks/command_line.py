"""The benchmarks' command lines, as experiments.main's: a mistake is one line and exit code 2.

    if __name__ == '__main__':
      command_line.run(main)

absl's own handling of a bad flag prints a FATAL line and a hint and exits 1,
and `app.UsageError` prints the whole usage text; here both are `error: ...`
on stderr and exit 2, and asking for help (--help, -h, --helpfull) exits 0.
"""

import sys

from absl import app
from absl import flags

EXIT_USAGE = 2
_HELP_FLAGS = ('--help', '-?', '--helpshort', '--helpfull', '--helpxml')


def usage_error(message: str):
  """Ends the command: `error: <message>` on stderr, exit code 2."""
  print(f'error: {message}', file=sys.stderr, flush=True)
  sys.exit(EXIT_USAGE)


def parse_flags(argv):
  """absl's parser, but a bad flag is one line and exit 2, and help exits 0."""
  argv = ['--help' if arg == '-h' else arg for arg in argv]
  try:
    return flags.FLAGS(argv)
  except flags.Error as e:
    usage_error(str(e))
  except SystemExit as e:
    # absl's help flags print the help and exit 1; asking for help is not a failure.
    if e.code == 1 and any(arg.split('=')[0] in _HELP_FLAGS for arg in argv[1:]):
      sys.exit(0)
    raise


def run(main):
  """app.run(main), with a bad flag, a stray argument and app.UsageError as one line, exit 2."""
  def checked_main(argv):
    if len(argv) > 1:
      usage_error(f'unexpected arguments: {" ".join(argv[1:])} (flags look like --name=value)')
    try:
      return main(argv)
    except app.UsageError as e:
      usage_error(str(e))
  app.run(checked_main, flags_parser=parse_flags)
