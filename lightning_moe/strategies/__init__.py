"""Lightning strategies for MoE models, registered in Lightning's ``StrategyRegistry`` on import."""

from lightning_moe.strategies.expert_parallel import ExpertParallelStrategy

__all__ = ["ExpertParallelStrategy"]
