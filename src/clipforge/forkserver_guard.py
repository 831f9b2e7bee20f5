"""Imported once, inside the fork server that starts DataLoader workers (``runtime.worker_start_method``
preloads it): the server dies with the command that started it, and its workers with it.

Why: a worker started by a fork server is the server's child, not the command's, so the command's
``kill -9`` left the server and its workers running (and holding the command's stdout open). The
workers already die with their parent (``runtime.die_with_parent``); this makes the server do the same.
"""

from clipforge.runtime import die_with_parent

die_with_parent()
