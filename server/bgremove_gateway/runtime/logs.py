"""Log setup that keeps image content out of the log at every level, DEBUG included.

Pillow logs each EXIF tag it parses, value and all (description, artist, GPS position...), on
the PIL.TiffImagePlugin logger at DEBUG, and its PNG and JPEG plugins log chunk and marker
details. Those loggers stay at WARNING whatever --log-level asks for.
"""

from __future__ import annotations

import logging
import sys

FORMAT = "%(asctime)s %(levelname)s %(name)s %(message)s"
# Libraries whose debug output quotes the data they parse.
CONTENT_LOGGERS = ("PIL",)


def configure_logging(level: str) -> None:
    logging.basicConfig(level=level.upper(), format=FORMAT, stream=sys.stderr)
    for name in CONTENT_LOGGERS:
        logging.getLogger(name).setLevel(logging.WARNING)
