"""virtwarden: shared configuration and errors used by every other package."""
__version__ = "0.1.0"
