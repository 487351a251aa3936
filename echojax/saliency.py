"""`python -m echojax.saliency` (documented entry point); the CLI lives in echojax/tools/saliency.py."""
from echojax.tools.saliency import *  # noqa: F401,F403
from echojax.tools.saliency import main

if __name__ == '__main__':
  main()
