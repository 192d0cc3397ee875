"""Flax NNX layers: the chapter's residual cell and the DEQ layer."""
from .cell import ResNetCell as ResNetCell
from .deq import DEQ as DEQ
from .deq import BackwardStatsProbe as BackwardStatsProbe
from .deq import ForwardStats as ForwardStats
