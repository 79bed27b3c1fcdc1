"""Spec -> modules. The only place where a spec's steps become `nn.Module`s.

One builder per [`Op`][cpcbm_blocks.layout.Op], chosen from a dict literal (no string if/elif chains).
Each builder reads its channels, stride and kernel from the [`Step`][cpcbm_blocks.layout.Step];
none of them recomputes the UNet's arithmetic.
"""

from collections.abc import Callable

from torch import nn

from cpcbm_blocks.blocks.attention import MultiHeadSelfAttention3D
from cpcbm_blocks.blocks.conv import Conv3d
from cpcbm_blocks.blocks.fusion_cross_attention import CrossAttentionFusion3D
from cpcbm_blocks.blocks.fusion_dynamic_conv import DynamicConvFusion3D
from cpcbm_blocks.blocks.fusion_gated import GatedInjection3D
from cpcbm_blocks.blocks.head import OutputHead
from cpcbm_blocks.blocks.resblock import ResBlock3D
from cpcbm_blocks.blocks.sampling import Downsample3D, Upsample3D
from cpcbm_blocks.layout import Op, Step, layout
from cpcbm_blocks.spec import UNetSpec

__all__ = ["build_blocks"]


def _res(step: Step, spec: UNetSpec) -> nn.Module:
    return ResBlock3D(in_channels=step.in_channels, out_channels=step.out_channels,
                      emb_channels=spec.time_embedding_channels, num_groups=spec.num_groups,
                      kernel_size=step.kernel_size, timestep_injection=spec.timestep_injection, dropout=spec.dropout)


def _dynamic_conv(step: Step, spec: UNetSpec) -> nn.Module:
    return DynamicConvFusion3D(channels=step.in_channels, num_experts=spec.conditioning.dynamic_conv_experts,
                               kernel_size=step.kernel_size, temperature=spec.conditioning.router_temperature,
                               num_groups=spec.num_groups)


_BUILDERS: dict[Op, Callable[[Step, UNetSpec], nn.Module]] = {
    Op.CONV_IN: lambda step, spec: Conv3d(step.in_channels, step.out_channels, kernel_size=step.kernel_size),
    Op.RES: _res,
    Op.ATTN: lambda step, spec: MultiHeadSelfAttention3D(channels=step.in_channels, head_channels=spec.head_channels,
                                                         num_groups=spec.num_groups, upcast=spec.upcast_attention),
    Op.DOWN: lambda step, spec: Downsample3D(channels=step.in_channels, stride=step.stride, kernel_size=step.kernel_size),
    Op.UP: lambda step, spec: Upsample3D(channels=step.in_channels, stride=step.stride, kernel_size=step.kernel_size),
    Op.FUSE_GATED: lambda step, spec: GatedInjection3D(channels=step.in_channels),
    Op.FUSE_DYNAMIC_CONV: _dynamic_conv,
    Op.FUSE_CROSS_ATTENTION: lambda step, spec: CrossAttentionFusion3D(
        channels=step.in_channels, context_channels=spec.conditioning.text_channels, head_channels=spec.head_channels,
        num_groups=spec.num_groups, upcast=spec.upcast_attention),
    Op.HEAD: lambda step, spec: OutputHead(in_channels=step.in_channels, out_channels=step.out_channels,
                                           num_groups=spec.num_groups, kernel_size=step.kernel_size),
}


def build_blocks(spec: UNetSpec) -> nn.ModuleDict:
    """One module per distinct `module_key` of `layout(spec)`, in execution order.

    Middle segments with `share_weights=True` share keys, so their modules are built (and registered)
    once.
    """
    blocks = nn.ModuleDict()
    for step in layout(spec):
        if step.module_key not in blocks:
            blocks[step.module_key] = _BUILDERS[step.op](step, spec)
    return blocks
