"""``python -m rltk`` (also what ``accelerate launch -m rltk train RECIPE`` runs)."""
import sys

from rltk.cli import main

if __name__ == "__main__":
    sys.exit(main())
