"""Lightning strategies for MoE models, registered in Lightning's ``StrategyRegistry`` on import."""

from lightning_moe.strategies.expert_parallel import ExpertParallelStrategy
from lightning_moe.strategies.expert_parallel_fsdp2 import ExpertParallelFSDP2Strategy

__all__ = ["ExpertParallelFSDP2Strategy", "ExpertParallelStrategy"]
