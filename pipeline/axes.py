"""Named dynamic axes: the names the exporter writes into every graph, and how they relate.

Kept apart from the export stage so the recipe schema can check optimization profiles
against them without importing torch.
"""

from __future__ import annotations

# every axis the exporter can declare, by task
DECODER_AXES = ("batch", "sequence", "past_sequence", "total_sequence")
ENCODER_AXES = ("batch", "sequence")
EXPORTED_AXES = DECODER_AXES

# axes that are a sum of others (attention_mask and present.* span the past plus the new tokens)
DERIVED_AXES = {"total_sequence": ("past_sequence", "sequence")}

# axes that may be 0: a prefill has no past
ZERO_ALLOWED = frozenset({"past_sequence"})

# every profile must bound these (both tasks declare them)
REQUIRED_AXES = ("batch", "sequence")
