"""The datasets' files: the original MNIST archives shipped in ``mnist/``, and the table of every
dataset's archives with the ways to get those that do not ship (:mod:`.archives`), for
:mod:`qsparse.data`."""
