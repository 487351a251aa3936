"""`python -m echojax.predict` (documented entry point); the CLI lives in echojax/tools/predict.py."""
from echojax.tools.predict import *  # noqa: F401,F403
from echojax.tools.predict import main

if __name__ == '__main__':
  main()
