"""The command-line interface: thin modules over the library (see app.py)."""
