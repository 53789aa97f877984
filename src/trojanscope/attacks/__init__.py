"""Attacks, for evaluation: they poison data; training lives in ``trojanscope.training``."""

from .base import ATTACKS, Attack, register_attack
from .badnets import BadNets
from .pruning_aware import PruningAware
from .trojannn import TrojanNN

__all__ = ["ATTACKS", "Attack", "BadNets", "PruningAware", "TrojanNN", "register_attack"]
