"""Command-line interface (``hadakit ...``); the library never imports it."""
