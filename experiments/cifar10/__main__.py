"""``python -m experiments.cifar10 --workdir DIR [flags]``; see ``main.py``."""
from .main import main

main()
