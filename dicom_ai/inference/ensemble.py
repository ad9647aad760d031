"""A deep ensemble: networks of one architecture trained from different seeds, their logits
averaged (Lakshminarayanan et al., NeurIPS 2017).

A bundle names it in ``configs/inference.json`` like any other network::

    {"_target_": "dicom_ai.inference.ensemble.LogitEnsemble",
     "members": [{"_target_": "monai.networks.nets.ResNet", ...}, ...]}

so the state dict holds ``members.0.*`` … ``members.{n-1}.*`` and a member's layer is named
``members.{k}.<layer>`` wherever a bundle names layers (Grad-CAM, the input-fit check).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn


class LogitEnsemble(nn.Module):
    """The mean of the members' logits; of each output, for members with several (the
    fracture network's image logit, centre-heatmap logits and log box sizes).

    Parameters
    ----------
    members
        Networks that map the same input to outputs of the same shapes (one tensor, or a tuple
        of tensors); at least one.

    Raises
    ------
    ValueError
        ``members`` is empty.
    """

    def __init__(self, members: Sequence[nn.Module]) -> None:
        super().__init__()
        if not members:
            raise ValueError("an ensemble needs at least one member")
        self.members = nn.ModuleList(members)

    def forward(self, x: torch.Tensor) -> torch.Tensor | tuple[torch.Tensor, ...]:
        """Mean over the members of ``member(x)``, output by output."""
        outputs = [member(x) for member in self.members]
        if isinstance(outputs[0], tuple):
            return tuple(torch.stack(parts).mean(dim=0) for parts in zip(*outputs, strict=True))
        return torch.stack(outputs).mean(dim=0)


def network_of(members: Sequence[nn.Module]) -> nn.Module:
    """The network a bundle holds: its one member, or the :class:`LogitEnsemble` of several."""
    return members[0] if len(members) == 1 else LogitEnsemble(members)


def member_layer(layer: str, member: int) -> str:
    """The name of ``layer`` of ensemble member ``member`` in the ensemble."""
    return f"members.{member}.{layer}"
