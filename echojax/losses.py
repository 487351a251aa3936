"""Documented path of the contrastive losses (`echojax.losses.nt_xent`); they live in echojax/core/losses.py."""
from echojax.core.losses import *  # noqa: F401,F403
from echojax.core.losses import nt_xent  # noqa: F401
