"""The ``wand`` daemon: entry point, server, store, client-process table, fd store, systemd.

It never imports the client library, and imports torch and the model libraries only when a
checkpoint must really be read (``tests/test_layout.py``).
"""
