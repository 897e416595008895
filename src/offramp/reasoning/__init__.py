"""Reasoning early exit (LYNX): cue events, forced exits, event datasets, the conformal probe, tasks.

The parts built on the engine are imported from their modules: ``offramp.reasoning.dataset``
(``build_dataset``, ``oracle_ceiling``) and ``offramp.reasoning.hf`` (``CueStoppingCriteria``)."""

from offramp.reasoning.cues import CueConfig, CueDetector, CueEvent, find_cues
from offramp.reasoning.forcing import FORCING_PRESETS, ForcedAnswer, force_answer, force_answers, fork_cache
from offramp.reasoning.probe import LynxProbe, first_exit
from offramp.reasoning.rowcache import RowCache
from offramp.reasoning.tasks import (PROMPT_PRESETS, Problem, extract_answer, gsm8k_problems, load_problems,
                                     reasoning_gym_problems)

__all__ = ["CueConfig", "CueDetector", "CueEvent", "FORCING_PRESETS", "ForcedAnswer",
           "LynxProbe", "PROMPT_PRESETS", "Problem", "RowCache", "extract_answer", "find_cues", "first_exit",
           "force_answer", "force_answers", "fork_cache", "gsm8k_problems", "load_problems",
           "reasoning_gym_problems"]
