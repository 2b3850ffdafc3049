"""The one exception type for mistakes a user can make (bad names, shapes, files).

The command line turns it into a single line on stderr and exit code 2; anything
else that escapes is a bug and keeps its traceback.
"""


class UsageError(ValueError):
  """A request the library cannot honour because of its inputs, not a bug."""
