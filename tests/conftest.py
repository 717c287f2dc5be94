import os
import sys

# The scripts live at the top of the repository, not in a package.
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
