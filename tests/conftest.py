import sys
from pathlib import Path

# Make tests/ importable as plain modules (paths.py, fixtures/detweights.py) without a package.
sys.path.insert(0, str(Path(__file__).resolve().parent))
