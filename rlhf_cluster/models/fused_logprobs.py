"""Log-probs of chosen tokens through cut-cross-entropy's fused kernels: no [tokens, vocab] logits.

`chunked_logprobs` still writes each chunk's [chunk, vocab] logits to memory, reads them back
several times in float32 and does it all again in the backward. Apple's cut-cross-entropy (PyPI
`cut-cross-entropy`, 25.1.1; Triton) keeps each tile of logits in registers: its forward gives
each row's log-sum-exp and the chosen token's logit, its backward recomputes the tiles and adds
their products into the gradients of the hidden states and of the output layer. Measured by
others: 13.8x faster and 13x less memory than chunking at 4k tokens on one H100 (TRL#6858).

What the kernels give (read from 25.1.1's source), and what this head makes of it:
- `linear_cross_entropy(e, c, targets, reduction="none")` is nll = lse(c e) - c_y . e per row, in
  float32; log p(y) = -nll. Its backward multiplies each row's (softmax - onehot) by that row's
  upstream gradient before both products, so any per-token gradient weights are exact.
- `filter_eps=None`: by default the backward skips blocks whose softmax is below an epsilon (an
  approximation); off here, so the gradients are the whole softmax's.
- No temperature: logits / T = c (e / T), so the hidden states are scaled before the kernel.
- No bias, no entropy, and a backward for bf16/fp16 hidden states only. The chunked head runs
  those cases, logged once: an output layer with a bias, a gradient through float32 weights, and
  an entropy bonus (`choose_logprob_head`). The entropies the learner reads as a metric come from
  a Triton kernel of ours (`entropy_kernel`, no logits written), as a tensor without a gradient
  (as `.detach()` gives), or from the chunked head's forward where that kernel fails to run.
- Its backward adds each tile's partial products into the gradients in their own dtype (bf16),
  where the chunked head sums in float32: in bf16 the hidden states' gradient at Qwen2.5's output
  layer (896 x 151,936, 1,187 vocabulary tiles) is ~1.4% from the exact one by norm, the chunked
  head's ~0.6% (from its bf16 logits), 1.5% apart (that accumulation emulated on the CPU, 64 random
  tokens; on CUDA: tests/gpu/test_fused_logprob_head.py).
- Its public `linear_cross_entropy` reads the rows whose target is not ignored back to the host
  (`nonzero`: a sync per call, where the learner waits for the device once per update); every row
  here is scored, so its autograd function is called directly with no such mask (`_kernel_nll`).
"""

from __future__ import annotations

import dataclasses
import functools
import logging

import torch

from rlhf_cluster.models.chunked_logprobs import DEFAULT_CHUNK_TOKENS, TokenHead, token_logprobs

log = logging.getLogger(__name__)

_logged: set[str] = set()


def _log_once(key: str, message: str) -> None:
    if key not in _logged:
        _logged.add(key)
        log.warning(message)


@functools.cache
def cce_available() -> bool:
    """Whether cut-cross-entropy imports here (it needs Triton)."""
    try:
        import cut_cross_entropy  # noqa: F401
    except ImportError:
        return False
    return True


def choose_logprob_head(choice: str, device: torch.device, entropy_gradient: bool, half_precision: bool = True) -> str:
    """The head ("chunked" or "fused") a learner on `device` scores with for `learner.logprob_head`.
    `entropy_gradient`: the loss takes the entropy's gradient (algorithm.entropy_coef > 0), which
    the fused kernels do not give; `half_precision`: the learner computes in bf16
    (learner.mixed_precision), the only weights the kernels' backward takes. `auto` is fused on CUDA
    where the package imports and both hold (else chunked, logged once); `fused` where any of it is
    missing is refused, naming the setting."""
    if choice == "chunked":
        return "chunked"
    if choice not in ("auto", "fused"):
        raise ValueError(f"learner.logprob_head must be auto, chunked or fused, got {choice!r}")
    missing = _missing(device, entropy_gradient, half_precision)
    if missing is None:
        return "fused"
    if choice == "fused":
        raise ValueError(f"learner.logprob_head: fused {missing}: use chunked or auto")
    if device.type == "cuda" and cce_available():  # auto where the kernels would run: say why they do not
        _log_once(missing, f"learner.logprob_head: the chunked head runs: fused {missing}")
    return "chunked"


def _missing(device: torch.device, entropy_gradient: bool, half_precision: bool) -> str | None:
    """What the fused head lacks on this learner (None: nothing)."""
    if device.type != "cuda":
        return f"needs CUDA (cut-cross-entropy's kernels are Triton GPU kernels), this learner runs on {device.type}"
    if not cce_available():
        return "needs cut-cross-entropy, which is not installed (pip install cut-cross-entropy==25.1.1)"
    if entropy_gradient:
        return "cannot give the entropy's gradient that algorithm.entropy_coef > 0 asks for"
    if not half_precision:
        return "trains through bf16 weights only (its backward takes bf16/fp16): set learner.mixed_precision: bf16"
    return None


def logprob_head_for(
    choice: str, device: torch.device, entropy_gradient: bool, half_precision: bool = True
) -> TokenHead:
    """The function `scored_positions` runs for `choose_logprob_head`'s choice."""
    head = choose_logprob_head(choice, device, entropy_gradient, half_precision)
    return fused_token_logprobs if head == "fused" else token_logprobs


def _unsupported(hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> str | None:
    """Why the kernels cannot serve this call (the chunked head then does), None where they can."""
    if bias is not None:
        return "an output layer with a bias (cut-cross-entropy 25.1.1 takes none)"
    dtype = str(hidden.dtype).removeprefix("torch.")
    if hidden.dtype != weight.dtype:
        return f"hidden states in {dtype} under {str(weight.dtype).removeprefix('torch.')} weights"
    grad = torch.is_grad_enabled() and (hidden.requires_grad or weight.requires_grad)
    if grad and hidden.dtype not in (torch.bfloat16, torch.float16):
        return f"a gradient through {dtype} weights (the kernels' backward takes bf16/fp16 only)"
    return None


# The fields of cut-cross-entropy 25.1.1's `cce.CCEParams`, what `_kernel_nll` fills in.
_CCE_PARAMS = {"targets", "valids", "softcap", "reduction", "filter_eps", "shift", "batch_shape"}


@functools.cache
def _direct_call() -> bool:
    """Whether the installed cut-cross-entropy has 25.1.1's internals, which `_kernel_nll` calls to
    leave out the public function's host sync (elsewhere it calls the public function)."""
    try:
        from cut_cross_entropy.cce import CCEParams, linear_cross_entropy_apply  # noqa: F401
    except ImportError:
        return False
    return {field.name for field in dataclasses.fields(CCEParams)} == _CCE_PARAMS


def _kernel_nll(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """float32 -log softmax(weight @ hidden[i])[targets[i]] per row, by cut-cross-entropy's kernels,
    every softmax entry in the gradient (`filter_eps=None`). Every row is valid: no mask of valid
    rows (`valids=None`), whose building reads the device (25.1.1's `cce_linear_cross_entropy`
    otherwise, with the same arguments)."""
    if not _direct_call():
        from cut_cross_entropy import linear_cross_entropy

        return linear_cross_entropy(hidden, weight, targets, reduction="none", filter_eps=None)
    from cut_cross_entropy.cce import CCEParams, linear_cross_entropy_apply

    params = CCEParams(
        targets=targets.contiguous(),
        valids=None,
        softcap=None,
        reduction="none",
        filter_eps=None,
        shift=False,
        batch_shape=targets.shape,
    )
    return linear_cross_entropy_apply(hidden.contiguous(), weight, params)


def fused_token_logprobs(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    bias: torch.Tensor | None = None,
    temperature: float = 1.0,
    with_entropy: bool = False,
    chunk_tokens: int = DEFAULT_CHUNK_TOKENS,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """`token_logprobs` (same arguments, same results) through cut-cross-entropy's kernels: float32
    log p(targets[i] | hidden[i]) for hidden [N, H] under the output layer `weight` [V, H] at
    `temperature`, and the entropies when asked (`entropy_kernel`: they take no gradient). CUDA tensors (or
    Triton's interpreter); the cases the kernels do not cover run the chunked head (`_unsupported`)."""
    reason = _unsupported(hidden, weight, bias)
    if reason is not None:
        _log_once(reason, f"learner.logprob_head: the chunked head runs {reason}")
    if reason is not None or hidden.shape[0] == 0:  # no rows: no kernel to launch
        return token_logprobs(hidden, weight, targets, bias, temperature, with_entropy, chunk_tokens)
    scaled = hidden if temperature == 1.0 else hidden * (1.0 / temperature)
    logp = _kernel_nll(scaled, weight, targets).neg()
    if not with_entropy:
        return logp, None
    hidden, weight = hidden.detach(), weight.detach()  # the entropies: a metric, no gradient
    if not _entropy_failed:
        try:
            return logp, _kernel_entropy(hidden, weight, temperature)
        except Exception as exc:  # the kernel failed to build or run on this device: said once, not again
            _entropy_failed.append(repr(exc))
            log.warning("learner.logprob_head: the entropy kernel failed (%r): the chunked head's forward instead", exc)
    with torch.no_grad():
        _, entropy = token_logprobs(hidden, weight, targets, None, temperature, True, chunk_tokens)
    return logp, entropy


_entropy_failed: list[str] = []  # why `entropy_kernel` failed in this process, where it did


def _kernel_entropy(hidden: torch.Tensor, weight: torch.Tensor, temperature: float) -> torch.Tensor:
    """float32 entropies of softmax(weight @ hidden[i] / temperature) by `entropy_kernel` (Triton),
    not requiring a gradient."""
    from rlhf_cluster.models.entropy_kernel import softmax_entropy

    return softmax_entropy(hidden, weight, temperature)
