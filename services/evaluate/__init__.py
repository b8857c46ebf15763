"""SAE fidelity inside the model: `run_evaluate(EvaluateConfig(sae=..., images=...))` splices the SAE into the backbone
its store was extracted with and measures what the model's own output keeps (see services.evaluate.run)."""

from services.evaluate.run import FORMAT, PASSES, EvaluateConfig, run_evaluate

__all__ = ["FORMAT", "PASSES", "EvaluateConfig", "run_evaluate"]
