"""The write path: everything that writes the SDOML v2 layout.

``writer`` (the one frame writer), ``fits`` (the per-file SDOML v2 recipe, pure numpy),
``ingest`` (the Ray Data passes of ``sdofm data ingest``) and ``synthetic`` (the
simulated Sun). The read path is ``sdofm.datasets``.
"""
