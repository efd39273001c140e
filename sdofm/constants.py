"""Names and numbers of the SDOML v2 archive, in one place."""

AIA_CHANNELS: tuple[str, ...] = (
    "94A",
    "131A",
    "171A",
    "193A",
    "211A",
    "304A",
    "335A",
    "1600A",
    "1700A",
)
"""AIA channels in SDOML v2 order (EUV then UV)."""

HMI_CHANNELS: tuple[str, ...] = ("Bx", "By", "Bz")
"""HMI vector-field components, Gauss."""

# MEGS-A lines as named in sdomlv2_eve.zarr: (name, wavelength nm, log10 T of formation).
EVE_LINE_TABLE: tuple[tuple[str, float, float], ...] = (
    ("C III", 97.7020, 4.84),
    ("Fe IX", 17.1073, 5.81),
    ("Fe VIII", 13.1240, 5.57),
    ("Fe X", 17.7239, 6.04),
    ("Fe XI", 18.0401, 6.13),
    ("Fe XII", 19.5119, 6.19),
    ("Fe XIII", 20.2044, 6.27),
    ("Fe XIV", 21.1331, 6.30),
    ("Fe XIX", 10.8355, 7.00),
    ("Fe XV", 28.4160, 6.35),
    ("Fe XVI", 33.5410, 6.43),
    ("Fe XVIII", 9.3926, 6.81),
    ("Fe XVI_2", 36.0758, 6.43),
    ("Fe XX", 13.2840, 7.00),
    ("Fe XX_2", 12.1845, 7.00),
    ("Fe XX_3", 11.8660, 7.00),
    ("H I", 102.5720, 3.84),
    ("H I_2", 97.2537, 3.84),
    ("H I_3", 94.9743, 3.84),
    ("He I", 58.4334, 4.16),
    ("He II", 30.3786, 4.70),
    ("He II_2", 25.6317, 4.70),
    ("He I_2", 53.7030, 4.16),
    ("Mg IX", 36.8070, 5.99),
    ("Mg X", 62.4943, 6.05),
    ("Mg X_2", 60.9793, 6.05),
    ("Ne VII", 46.5221, 5.71),
    ("Ne VIII", 77.0409, 5.81),
    ("O II", 71.8535, 4.48),
    ("O III", 52.5794, 4.92),
    ("O III_2", 59.9597, 4.92),
    ("O II_2", 83.4500, 4.48),
    ("O IV", 55.4513, 5.19),
    ("O IV_2", 79.0199, 5.19),
    ("O V", 62.9730, 5.37),
    ("O VI", 103.1912, 5.47),
    ("S XIV", 44.5700, 6.27),
    ("Si XII", 49.9406, 6.29),
    ("Si XII_2", 52.0665, 6.29),
)
EVE_LINES: tuple[str, ...] = tuple(name for name, _, _ in EVE_LINE_TABLE)
"""All 39 MEGS-A lines of SDOML v2."""
EVE_LINES_USED: tuple[str, ...] = tuple(n for n in EVE_LINES if n != "Fe XVI_2")
"""The 38 lines SDO-FM uses (``Fe XVI_2`` is mostly missing in the archive)."""

AIA_WAVELENGTH: dict[str, int] = {c: int(c.rstrip("A")) for c in AIA_CHANNELS}

# Nominal level-1 exposure times (s); the AEC shortens them during flares.
AIA_EXPTIME: dict[str, float] = {
    "94A": 2.9,
    "131A": 2.9,
    "171A": 2.0,
    "193A": 2.0,
    "211A": 2.9,
    "304A": 2.9,
    "335A": 2.9,
    "1600A": 2.9,
    "1700A": 1.0,
}

SDOML_RESOLUTION = 512
SDOML_DISK_RADIUS_PX = 204.0  # at 512 px: 976 arcsec at 0.6 arcsec/px x 8
SOLAR_RADIUS_ARCSEC = 976.0
MIN_EXPTIME = 0.01  # seconds; guards against zero or garbage EXPTIME in headers


def disk_radius_px(size: int) -> float:
    """The solar disk radius in pixels of an SDOML frame of ``size`` x ``size`` px (204 at 512)."""
    return SDOML_DISK_RADIUS_PX * size / SDOML_RESOLUTION


# TAI - UTC (s) from each date on (IERS Bulletin C); HMI T_OBS is TAI.
LEAP_SECONDS: tuple[tuple[str, int], ...] = (
    ("1972-01-01", 10),
    ("1972-07-01", 11),
    ("1973-01-01", 12),
    ("1974-01-01", 13),
    ("1975-01-01", 14),
    ("1976-01-01", 15),
    ("1977-01-01", 16),
    ("1978-01-01", 17),
    ("1979-01-01", 18),
    ("1980-01-01", 19),
    ("1981-07-01", 20),
    ("1982-07-01", 21),
    ("1983-07-01", 22),
    ("1985-07-01", 23),
    ("1988-01-01", 24),
    ("1990-01-01", 25),
    ("1991-01-01", 26),
    ("1992-07-01", 27),
    ("1993-07-01", 28),
    ("1994-07-01", 29),
    ("1996-01-01", 30),
    ("1997-07-01", 31),
    ("1999-01-01", 32),
    ("2006-01-01", 33),
    ("2009-01-01", 34),
    ("2012-07-01", 35),
    ("2015-07-01", 36),
    ("2017-01-01", 37),
)
