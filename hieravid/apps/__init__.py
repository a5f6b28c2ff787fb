"""Applications built on the library: the ``hieravid`` command and what it runs.

``cli`` (the command), ``run`` (real checkpoints and videos), ``bench`` (GPU benchmark), ``demo``, ``viz``,
``video`` (decoding and preprocessing) and ``trace`` (per-request records on disk). They depend on the library
(:mod:`hieravid.policy`, :mod:`hieravid.plan`, :mod:`hieravid.runtime`, :mod:`hieravid.adapters`,
:mod:`hieravid.ops`); the library never imports them (``tests/test_architecture.py``).
"""
