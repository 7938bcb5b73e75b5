"""Internals of :mod:`frozennorm.ops`, by concern: ``rules`` (argument checks, compute
dtype, activation codes), ``fake`` (fake kernels), ``fallback`` (the pure-PyTorch kernels
and their autograd), ``capture`` (is a graph being captured?)."""
