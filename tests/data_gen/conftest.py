"""The data_gen tests import their helpers (fake server, answer oracle, fixtures) from this folder."""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
