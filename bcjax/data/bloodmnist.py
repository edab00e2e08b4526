"""Placeholder: BloodMNIST source."""

from bcjax import errors


def prepare(config):
  raise errors.UserError("config.data.source='bloodmnist' is not implemented yet")


raw_split = lambda config, split: prepare(config)
