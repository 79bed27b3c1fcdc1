"""cpcbm_blocks: typed, shape-checked 3D building blocks for diffusion and Brownian-bridge UNets.

The public API. Everything here is re-exported explicitly from the module that defines it.
"""

from cpcbm_blocks.blocks.attention import AttentionBackend as AttentionBackend
from cpcbm_blocks.blocks.attention import MultiHeadSelfAttention3D as MultiHeadSelfAttention3D
from cpcbm_blocks.blocks.attention import attention as attention
from cpcbm_blocks.blocks.attention import attention_backend as attention_backend
from cpcbm_blocks.blocks.attention import set_attention_backend as set_attention_backend
from cpcbm_blocks.blocks.cond_image_encoder import CondImageEncoder3D as CondImageEncoder3D
from cpcbm_blocks.blocks.conv import Conv3d as Conv3d
from cpcbm_blocks.blocks.conv_weight_grad import set_weight_grad_method as set_weight_grad_method
from cpcbm_blocks.blocks.embedding import TimestepEmbedding as TimestepEmbedding
from cpcbm_blocks.blocks.fusion_cross_attention import CrossAttentionFusion3D as CrossAttentionFusion3D
from cpcbm_blocks.blocks.fusion_dynamic_conv import DynamicConvFusion3D as DynamicConvFusion3D
from cpcbm_blocks.blocks.fusion_gated import GatedFusion3D as GatedFusion3D
from cpcbm_blocks.blocks.fusion_gated import GatedInjection3D as GatedInjection3D
from cpcbm_blocks.blocks.head import OutputHead as OutputHead
from cpcbm_blocks.blocks.resblock import ResBlock3D as ResBlock3D
from cpcbm_blocks.blocks.sampling import Downsample3D as Downsample3D
from cpcbm_blocks.blocks.sampling import Upsample3D as Upsample3D
from cpcbm_blocks.conditioning import EncodedConditions as EncodedConditions
from cpcbm_blocks.contracts import set_shape_checks as set_shape_checks
from cpcbm_blocks.contracts import shape_checked as shape_checked
from cpcbm_blocks.contracts import shape_checks as shape_checks
from cpcbm_blocks.errors import CheckpointError as CheckpointError
from cpcbm_blocks.errors import CpcbmError as CpcbmError
from cpcbm_blocks.errors import InputError as InputError
from cpcbm_blocks.errors import ShapeContractError as ShapeContractError
from cpcbm_blocks.errors import SpecError as SpecError
from cpcbm_blocks.errors import TraceMismatchError as TraceMismatchError
from cpcbm_blocks.errors import TraceNotationError as TraceNotationError
from cpcbm_blocks.guidance import ConditionDropout as ConditionDropout
from cpcbm_blocks.guidance import guidance_conditions as guidance_conditions
from cpcbm_blocks.guidance import guided_prediction as guided_prediction
from cpcbm_blocks.layout import Op as Op
from cpcbm_blocks.layout import Section as Section
from cpcbm_blocks.layout import Step as Step
from cpcbm_blocks.layout import layout as layout
from cpcbm_blocks.notation import parse_trace as parse_trace
from cpcbm_blocks.notation import render_trace as render_trace
from cpcbm_blocks.plan import Plan as Plan
from cpcbm_blocks.plan import Transition as Transition
from cpcbm_blocks.plan import plan as plan
from cpcbm_blocks.spec import ConditioningSpec as ConditioningSpec
from cpcbm_blocks.spec import FusionKind as FusionKind
from cpcbm_blocks.spec import LevelSpec as LevelSpec
from cpcbm_blocks.spec import MidSpec as MidSpec
from cpcbm_blocks.spec import TimestepInjection as TimestepInjection
from cpcbm_blocks.spec import UNetSpec as UNetSpec
from cpcbm_blocks.trace import record_trace as record_trace
from cpcbm_blocks.unet import UNet3D as UNet3D

__version__ = "0.1.0"
