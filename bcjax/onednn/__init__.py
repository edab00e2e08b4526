"""oneDNN convolution kernels for XLA:CPU (see ``build`` and ``conv``)."""
