"""Placeholder: the labelled-folder split 'all' (implemented with PBC)."""

from bcjax import errors


def raw_all(config):
  raise errors.UserError("split 'all' is not implemented yet")
