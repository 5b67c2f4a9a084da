"""The one exception type for bad input a user can fix.

``UserError`` is raised for a bad config value, a missing or unreadable file, a malformed data row, a
path that is not a model... Its message is one line that names the field or file (with the row or
line where there is one) and says how to fix it. The ``tether`` command prints it as
``tether <command>: error: <message>`` and exits with code 2, without a traceback (``--debug`` or
``TETHER_DEBUG=1`` shows one). Any other exception is a bug in tether and keeps its traceback.

It subclasses ``ValueError`` so that callers (and tests) that catch ``ValueError`` keep working.
"""

from __future__ import annotations


class UserError(ValueError):
    """A bad input the user can fix; the message names the field or file and the fix."""
