"""Dataset curation (the Dolphin recipe's "deduped, cleaned, de-aligned" data): `curate(config) -> CurateResult`.

Modules, one concept each: `filters` (the verdict type and turn removal), `cleaning`, `language`,
`function_calling` (the ChatML tool-call convention, validated), `refusal`, `system_prompts`, `dedup`, `mixing`,
`rows` (the output row), `report`, and `pipeline` (the streaming multi-process run that ties them together).
"""

from dolphin_forge.curate.pipeline import CurateResult, curate

__all__ = ["CurateResult", "curate"]
