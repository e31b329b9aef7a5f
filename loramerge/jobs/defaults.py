"""The choices and defaults of the jobs' options that are not a registry of their own. Torch-free,
so that the command line's help shows them without loading torch; the jobs take them from here.
(Formats: loramerge.formats.registry; engines: loramerge.engines.profiles; ResLoRA rules:
loramerge.ops.reslora_table; output dtypes: loramerge.io.dtypes.)"""

from __future__ import annotations

# truncate: prefix keeps DyLoRA's trained first ranks, svd reduces optimally, dylora is prefix
# on an input declared to be DyLoRA
TRUNCATE_METHODS = ("prefix", "svd", "dylora")
# fold: round the whole chain's sum once, or after every link as training did
ROUNDINGS = ("once", "per-link")
# verify: a difference passes when it is at most atol + rtol x the source's size
VERIFY_ATOL = 1e-6
VERIFY_RTOL = 1e-4
VERIFY_MAX_TOKENS = 512  # of the text, further capped by the base's max_position_embeddings
# text run through a model (reslora --check-text, reslora-stats)
SEQ_LEN = 128
BATCH_SIZE = 8
