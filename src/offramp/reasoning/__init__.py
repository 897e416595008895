"""Reasoning early exit (LYNX): cue events, forced exits, event datasets, the conformal probe, tasks."""

from offramp.reasoning.cues import CueConfig, CueDetector, CueEvent, find_cues
from offramp.reasoning.forcing import FORCING_PRESETS, ForcedAnswer, force_answer, fork_cache
from offramp.reasoning.probe import LynxProbe, first_exit
from offramp.reasoning.tasks import Problem, extract_answer, gsm8k_problems, load_problems, reasoning_gym_problems

__all__ = ["CueConfig", "CueDetector", "CueEvent", "FORCING_PRESETS", "ForcedAnswer", "LynxProbe", "Problem",
           "extract_answer", "find_cues", "first_exit", "force_answer", "fork_cache", "gsm8k_problems",
           "load_problems", "reasoning_gym_problems"]
