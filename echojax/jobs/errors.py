"""How a job ends: the exit codes `python -m echojax.main` returns and the user-error base class whose
message is printed as one line (no traceback unless --verbose). A scheduler can requeue on EXIT_PREEMPTED
and EXIT_PEER_LOST; the other non-zero codes need a person."""
from __future__ import annotations

EXIT_OK = 0
EXIT_ERROR = 1          # an unexpected error (traceback printed)
EXIT_USER_ERROR = 2     # a config / workdir / input mistake (one line)
EXIT_NONFINITE = 3      # the non-finite guard stopped training (one line; the last good checkpoint is kept)
EXIT_PREEMPTED = 75     # a SIGTERM/SIGINT or JAX preemption notice: checkpoint saved, rerun to resume
EXIT_PEER_LOST = 76     # another process of a multi-process job died or hung; the last checkpoint is intact


class UserError(Exception):
  """A mistake the user can fix from the message alone (main prints `echojax: error: <message>`)."""


class ConfigError(UserError, ValueError):
  """A config value of the wrong type, shape or range, or keys that contradict each other."""


class Preempted(SystemExit):
  """Raised once the preemption checkpoint is written, so nothing carries on with a half-trained model.
  A SystemExit whose code is EXIT_PREEMPTED; str() is the one-line message."""

  def __init__(self, message: str):
    super().__init__(EXIT_PREEMPTED)
    self.message = message

  def __str__(self) -> str:
    return self.message
