"""Attacks, for evaluation: they poison data; training lives in ``trojanscope.training``."""

from .base import ATTACKS, Attack, register_attack
from .badnets import BadNets

__all__ = ["ATTACKS", "Attack", "BadNets", "register_attack"]
