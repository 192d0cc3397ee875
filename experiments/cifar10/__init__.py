"""CIFAR-10 experiment: a small conv DEQ trained on CIFAR-10, as in the seed chapter."""
