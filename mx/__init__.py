"""mx: a whole mail server in one twistd plugin."""

__version__ = "0.1.0"
