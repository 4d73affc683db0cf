"""A pool model served from a directory on disk: ray.serve.llm's node initialisation is skipped.

Before it starts vLLM, ray.serve.llm runs a Ray task on each node of the replica's placement group to
download the model. The task needs a fresh worker with the replica's runtime env (vLLM's imports), which
costs tens of seconds on a small machine and downloads nothing when the source is already a directory on
the replica's node. Such a source skips the step; any other (a hub id, a bucket) keeps it.
"""

from __future__ import annotations

import os

# the hook ray.serve.llm documents for custom node initialisation (its CloudDownloader is one)
from ray.llm._internal.common.callbacks.base import CallbackBase


class LocalModelCallback(CallbackBase):
    async def on_before_node_init(self) -> None:
        source = self.llm_config.model_loading_config.model_source
        if isinstance(source, str) and os.path.isdir(source):
            self.ctx.run_init_node = False
