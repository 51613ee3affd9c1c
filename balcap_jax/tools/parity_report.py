"""What a parity check reports: the largest logit difference and the per-token KL against the reference, over
the real tokens. Shared by the Qwen2.5-VL (`tools.parity`) and LLaVA (`tools.parity_llava`) checks."""

from __future__ import annotations

import dataclasses

import numpy as np


@dataclasses.dataclass(frozen=True)
class ParityReport:
    max_abs_logit_diff: float
    mean_kl: float
    max_kl: float
    num_tokens: int

    def ok(self, *, logit_tol: float, kl_tol: float) -> bool:
        return self.max_abs_logit_diff <= logit_tol and self.max_kl <= kl_tol

    def __str__(self) -> str:
        return (f"tokens compared: {self.num_tokens}\nmax |logit diff|: {self.max_abs_logit_diff:.3e}\n"
                f"per-token KL(HF||ours): mean {self.mean_kl:.3e}, max {self.max_kl:.3e}")


def compare(reference: np.ndarray, ours: np.ndarray, mask: np.ndarray) -> ParityReport:
    """Max |logit diff| and per-token KL(reference || ours) over the real tokens (mask True)."""
    ref, out = reference[mask].astype(np.float64), ours[mask].astype(np.float64)
    log_p = ref - _logsumexp(ref)
    log_q = out - _logsumexp(out)
    kl = np.sum(np.exp(log_p) * (log_p - log_q), axis=-1)
    return ParityReport(float(np.max(np.abs(ref - out))), float(kl.mean()), float(kl.max()), int(mask.sum()))


def _logsumexp(x: np.ndarray) -> np.ndarray:
    top = x.max(axis=-1, keepdims=True)
    return top + np.log(np.sum(np.exp(x - top), axis=-1, keepdims=True))
