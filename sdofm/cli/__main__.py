"""``python -m sdofm.cli``: the same app as the ``sdofm`` console script."""

from sdofm.cli import app

app()
