"""The package's version, in one place: ``pyproject.toml`` reads it for the wheel, and the files that
record which aim-ds wrote them (checkpoints, exports, beton sidecars) import it from here."""

__version__ = "0.1.0"
