"""sdofm: foundation models of the Sun on SDO data."""

__version__ = "0.1.0"
