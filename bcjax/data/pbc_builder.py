"""Placeholder: PBC TFDS builder."""

from bcjax import errors


def prepare(config):
  raise errors.UserError("config.data.source='pbc' is not implemented yet")


raw_split = lambda config, split: prepare(config)
