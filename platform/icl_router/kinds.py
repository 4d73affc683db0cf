"""The closed sets of names the platform accepts, each defined once.

Configs, the CLI (argparse choices from ``typing.get_args``), the importers, the
prompt layout, the routing policies and the service's request body import them
from here, so adding a name is one edit. Pure typing: safe to import anywhere.
"""

from __future__ import annotations

from typing import Literal

# Public routing-data formats ``icl-router import`` reads (data/importers.py).
# ``local``: LLMRouter's questions with the outcomes of the packaged real LMs recorded here.
DatasetFormat = Literal["llmrouter", "zeroeval", "routerbench", "iclrouter", "local", "decisions"]

# Routing policies (routing/policy.py): from p(correct) per model to one model.
PolicyKind = Literal["highest", "threshold", "margin", "budget", "cost"]

# How the router reads the query (model/prompt.py): its text, or its embedding in one slot.
QueryInput = Literal["text", "vector"]

# How a profile is laid out (model/prompt.py): (slot, label) pairs, or the label fused onto the slot.
ProfileLayout = Literal["pairs", "fused"]

# How a model is asked a benchmark question and how its answer is read (data/profile.py, graders/):
# ``json``: ZeroEval's protocol, reasoning then a JSON object whose "answer" field is graded;
# ``short``: the answer alone, the whole response graded (small models cannot keep to a JSON format).
PromptStyle = Literal["json", "short"]

# Where a model runs (configs of the profiling job and of the service's pool).
Accelerator = Literal["cpu", "gpu"]

# Which path scores a query (routing/online.py): the router LM with the evidence, the evidence
# head alone, or auto (the evidence head when the router LM is silent).
Scoring = Literal["auto", "full", "evidence"]

# Where the router LM runs (model/device.py): auto is cuda where the process sees a GPU, else cpu.
Device = Literal["auto", "cpu", "cuda"]

# The router LM's weights (model/device.py): auto is bfloat16 on cuda, float32 on cpu.
DType = Literal["auto", "float32", "bfloat16", "float16"]
