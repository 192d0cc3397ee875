"""Flax NNX layers: the chapter's residual cell, the multiscale DEQ cell and head, and the DEQ layer."""
from .cell import ResNetCell as ResNetCell
from .conv import default_conv as default_conv
from .conv import loop_friendly_conv as loop_friendly_conv
from .deq import DEQ as DEQ
from .deq import WITH_BACKWARD_STATS as WITH_BACKWARD_STATS
from .deq import BackwardStatsProbe as BackwardStatsProbe
from .deq import explicit_cell as explicit_cell
from .deq import split_backward_stats as split_backward_stats
from .group_norm import GroupNorm as GroupNorm
from .mdeq import MDEQCell as MDEQCell
from .mdeq import VariationalDropout as VariationalDropout
from .mdeq_head import MDEQClassifierHead as MDEQClassifierHead
from .mdeq_head import MDEQStem as MDEQStem
from .group_norm import group_norm as group_norm
from .weight_norm import WeightNorm as WeightNorm
