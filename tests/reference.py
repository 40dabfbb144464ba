"""In-process reference for end-to-end checks: the action scores a fresh, cache-free forward of
`mouse_core` gives over a list of step records (what a session's context should hold)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from mouse_core import load_model
from mouse_core.sampling import vec_dqn_scores

TOLERANCE = {"rtol": 1e-4, "atol": 1e-5}  # the golden tolerance


class Reference:
    """A model loaded in this process (float32, CPU)."""

    def __init__(self, checkpoint: str | Path) -> None:
        self.model = load_model(checkpoint, device="cpu", dtype="float32")

    @torch.inference_mode()
    def scores(self, records: Sequence[Mapping[str, Any]], num_actions: int | None = None) -> np.ndarray:
        """Action scores after the last record (the first `num_actions`)."""
        stream = {}
        for spec in self.model.step_schema.fields:
            values = np.stack([np.asarray(r[spec.name]) for r in records])
            dtype = torch.float32 if spec.kind == "float" else torch.int64
            stream[spec.name] = torch.as_tensor(values, dtype=dtype).unsqueeze(0)
        threads = torch.get_num_threads()
        torch.set_num_threads(1)  # tiny forwards: threads only contend (the server runs beside)
        try:
            out, _ = self.model(stream)
        finally:
            torch.set_num_threads(threads)
        raw = out[self.model.action_head][0, -1]
        scores = vec_dqn_scores(raw) if self.model.action_head == "vec_dqn" else raw
        return scores[: num_actions or scores.shape[-1]].float().numpy()

    def assert_context(
        self, reply: Any, records: Sequence[Mapping[str, Any]], num_actions: int | None = None
    ) -> None:
        """The server's reply (with `return_scores`) was computed over exactly `records`."""
        assert reply.context_steps == len(records), (reply.context_steps, len(records))
        np.testing.assert_allclose(np.asarray(reply.scores), self.scores(records, num_actions), **TOLERANCE)
