"""Allow `python -m livertumorai`."""

from .cli import run

run()
