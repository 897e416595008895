"""offramp: early exits for Hugging Face transformer and Mamba models that really skip the compute."""

__version__ = "0.1.0"

from offramp.config import OfframpConfig  # noqa: E402
from offramp.modeling import DecoderExitModel, EarlyExitModel, EarlyExitOutput, Prediction, load  # noqa: E402
from offramp.policies import POLICIES, ExitPolicy, make_policy  # noqa: E402

__all__ = ["DecoderExitModel", "EarlyExitModel", "EarlyExitOutput", "ExitPolicy", "OfframpConfig", "POLICIES",
           "Prediction", "load", "make_policy", "__version__"]
