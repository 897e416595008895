"""Stopping a chain of thought early (LYNX, DEER): the engine (``engine``: ``reason``,
``iter_reason``, ``reason_batch``), cue events (``cues``), forced answers from a forked cache
(``forcing``), the batched chains' row cache (``rowcache``) and the same rules as a Hugging Face
``StoppingCriteria`` (``stopping``). Event datasets are traces: ``offramp.evaluation.events``; the
LYNX probe is a calibrator: ``offramp.calibration.lynx``; the tasks are data: ``offramp.data.tasks``."""

from offramp.engines.reason.cues import CueConfig, CueDetector, CueEvent, find_cues
from offramp.engines.reason.engine import (
                                           SIGNALS,
                                           ReasonBatch,
                                           ReasonConfig,
                                           ReasonResult,
                                           chain_positions,
                                           check_chain_positions,
                                           eos_ids,
                                           event_signals,
                                           iter_reason,
                                           prompt_ids,
                                           reason,
                                           reason_batch,
                                           trial_value,
)
from offramp.engines.reason.forcing import FORCING_PRESETS, ForcedAnswer, force_answer, force_answers, fork_cache
from offramp.engines.reason.rowcache import RowCache
from offramp.engines.reason.stopping import CueStoppingCriteria

__all__ = ["SIGNALS", "CueConfig", "CueDetector", "CueEvent", "CueStoppingCriteria", "FORCING_PRESETS",
           "ForcedAnswer", "ReasonBatch", "ReasonConfig", "ReasonResult", "RowCache", "chain_positions", "check_chain_positions",
           "eos_ids", "event_signals", "find_cues",
           "force_answer", "force_answers", "fork_cache", "iter_reason", "prompt_ids", "reason", "reason_batch",
           "trial_value"]
