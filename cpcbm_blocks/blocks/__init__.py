"""The typed 3D blocks. Each lives in its own file and can be used on its own."""

from cpcbm_blocks.blocks.attention import AttentionBackend as AttentionBackend
from cpcbm_blocks.blocks.attention import MultiHeadSelfAttention3D as MultiHeadSelfAttention3D
from cpcbm_blocks.blocks.attention import attention as attention
from cpcbm_blocks.blocks.attention import attention_backend as attention_backend
from cpcbm_blocks.blocks.attention import set_attention_backend as set_attention_backend
from cpcbm_blocks.blocks.cond_image_encoder import CondImageEncoder3D as CondImageEncoder3D
from cpcbm_blocks.blocks.conv import Conv3d as Conv3d
from cpcbm_blocks.blocks.embedding import TimestepEmbedding as TimestepEmbedding
from cpcbm_blocks.blocks.fusion_cross_attention import CrossAttentionFusion3D as CrossAttentionFusion3D
from cpcbm_blocks.blocks.fusion_dynamic_conv import DynamicConvFusion3D as DynamicConvFusion3D
from cpcbm_blocks.blocks.fusion_gated import GatedFusion3D as GatedFusion3D
from cpcbm_blocks.blocks.fusion_gated import GatedInjection3D as GatedInjection3D
from cpcbm_blocks.blocks.head import OutputHead as OutputHead
from cpcbm_blocks.blocks.resblock import ResBlock3D as ResBlock3D
from cpcbm_blocks.blocks.sampling import Downsample3D as Downsample3D
from cpcbm_blocks.blocks.sampling import Upsample3D as Upsample3D
