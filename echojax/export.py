"""`python -m echojax.export` (documented entry point); the CLI lives in echojax/tools/export.py."""
from echojax.tools.export import *  # noqa: F401,F403
from echojax.tools.export import main

if __name__ == '__main__':
  main()
