"""Pure tensor operators of the three HieraVid levels. They know nothing about modules or models.

Segment level (:mod:`hieravid.ops.segment`; the peer methods' input-level operators and their registry
in :mod:`hieravid.ops.peers`), frame level (:mod:`~hieravid.ops.relevance`,
:mod:`~hieravid.ops.budget`, :mod:`~hieravid.ops.dpp`, :mod:`~hieravid.ops.selectors`) and layer level
(:mod:`~hieravid.ops.layer`). Importing this package imports neither transformers nor Triton and does
not initialise CUDA; Triton is imported lazily on the CUDA path of the DPP selection.
"""

from hieravid.ops._graphs import GraphCache
from hieravid.ops._registry import OperatorRegistry, UnregisteredOperatorError
from hieravid.ops.budget import most_kept, segment_budgets
from hieravid.ops.dpp import (
    DEFAULT_MAX_BLOCK,
    DPP_EPS,
    DppBackend,
    dpp_select,
    greedy_map_dpp,
    greedy_map_dpp_order,
    triton_available,
)
from hieravid.ops.layer import (
    FrameLevelResult,
    FrameStage,
    compose_keep,
    frame_level,
    stage_keep_fractions,
)
from hieravid.ops.peers import (
    DROPPED,
    INPUT_OPERATORS,
    InputOperator,
    dycoke,
    evs,
    framefusion,
    input_level,
    input_level_unread,
    random_input,
    register_input_operator,
    uniform_input,
    vidcom2,
)
from hieravid.ops.relevance import RelevanceSign, last_query_attention, normalize_relevance
from hieravid.ops.segment import (
    FIRST_FRAME_SIMILARITY,
    MergeResult,
    SegmentLevelResult,
    UnreadSegmentLevel,
    adjacent_frame_similarity,
    frame_redundancy,
    merge_redundant_tokens,
    num_merged_tokens,
    segment_frames,
    segment_level,
    segment_marginal_values,
    unread_segment_level,
)
from hieravid.ops.selectors import (
    SELECTORS,
    Selector,
    register_selector,
    select_tokens,
)

__all__ = [
    "DEFAULT_MAX_BLOCK",
    "DPP_EPS",
    "DROPPED",
    "FIRST_FRAME_SIMILARITY",
    "INPUT_OPERATORS",
    "SELECTORS",
    "DppBackend",
    "FrameLevelResult",
    "FrameStage",
    "GraphCache",
    "InputOperator",
    "MergeResult",
    "OperatorRegistry",
    "RelevanceSign",
    "SegmentLevelResult",
    "Selector",
    "UnreadSegmentLevel",
    "UnregisteredOperatorError",
    "adjacent_frame_similarity",
    "compose_keep",
    "dpp_select",
    "dycoke",
    "evs",
    "frame_level",
    "frame_redundancy",
    "framefusion",
    "greedy_map_dpp",
    "greedy_map_dpp_order",
    "input_level",
    "input_level_unread",
    "last_query_attention",
    "merge_redundant_tokens",
    "most_kept",
    "normalize_relevance",
    "num_merged_tokens",
    "random_input",
    "register_input_operator",
    "register_selector",
    "segment_budgets",
    "segment_frames",
    "segment_level",
    "segment_marginal_values",
    "select_tokens",
    "stage_keep_fractions",
    "triton_available",
    "uniform_input",
    "unread_segment_level",
    "vidcom2",
]
