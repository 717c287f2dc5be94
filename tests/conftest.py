import os
import sys

# The scripts live at the top of the repository, the tools in tools/; neither is a package.
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path[:0] = [ROOT, os.path.join(ROOT, "tools")]
