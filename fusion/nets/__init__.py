"""Fusion networks: a registry filled by importing the net modules (BDL, MoE-Fusion, TC-MoA).

``create_fusion_net(name, **kwargs)`` builds one; ``list_fusion_nets()`` lists the names (each real net has a
``<name>_tiny`` test variant); ``fused_output(out)`` turns any net output into ``(raw, aux_losses)``.
"""

from fusion.nets import bdl, moe_fusion, tc_moa  # noqa: F401  (importing registers the nets)
from fusion.nets.registry import (
    build_net,
    create_fusion_net,
    fused_output,
    list_fusion_nets,
    register_fusion_net,
)

__all__ = ["build_net", "create_fusion_net", "fused_output", "list_fusion_nets", "register_fusion_net"]
