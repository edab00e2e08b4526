"""The one exception type for user mistakes.

Raise :class:`UserError` for anything the user can fix (a bad path, a config
value that does not fit, an unreadable file they named). ``launch.py`` prints
its message as a single ``error: ...`` line and exits with status 2 instead of
showing a traceback; library callers (tests, notebooks) get a normal
exception. Programming errors stay ordinary exceptions with tracebacks.
"""


class UserError(Exception):
  """A mistake the user can fix; its message says what and where."""
