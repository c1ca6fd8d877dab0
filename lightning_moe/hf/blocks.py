"""Finding the sparse-MoE blocks of a Hugging Face model and reading their routing semantics.

Shape legend: T tokens, D model width, F expert hidden width, E experts, K experts per token.

Current ``transformers`` MoE families share one block shape: a child ``experts`` holding
``gate_up_proj`` [E, 2F, D] and ``down_proj`` [E, D, F] (SiLU-gated, gate rows first), and
a top-k router child with ``weight`` [E, D] that returns ``(logits, weights [T, K],
indices [T, K])``. Blocks are found by that structure, not by class name, so a sibling
family built from the same parts converts too. What differs is the routing function: it
is decided by running the router itself on a random probe against each routing
``MoELayer`` represents exactly (:func:`routing_of`), not by attribute names, which
families spell differently or not at all (Jamba has no ``norm_topk_prob`` and does not
renormalise). A block whose router computes anything else, or fails to run, is refused,
never converted approximately. DeepSeek-V3-style parts (sigmoid scores, expert groups, a
routed scaling factor, a selection bias, ungated shared experts) are read by
:mod:`lightning_moe.hf.sigmoid_blocks`.
"""

from __future__ import annotations

import copy
import itertools
from dataclasses import dataclass, field, replace

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lightning_moe.data.sources import first_line
from lightning_moe.estimators import ESTIMATOR_REGISTRY, Estimator
from lightning_moe.experts import Activation
from lightning_moe.hf.biased_experts import (
    BiasedExpertsError,
    check_biased_layout,
    expected_output,
    has_biased_clamped_experts,
    probe_reaching_clamps,
)
from lightning_moe.hf.sigmoid_blocks import (
    SHARED_EXPERTS,
    ScoredRoutingError,
    describe_scoring,
    has_ungated_shared_experts,
    probe_selection_bias,
    router_scoring,
    selection_bias_name,
    write_selection_bias,
)
from lightning_moe.routing import Scoring

#: Children a convertible block may have besides its router and ``experts``.
SHARED_EXPERT = "shared_expert"
SHARED_EXPERT_GATE = "shared_expert_gate"
ROUTER_NAMES = ("gate", "router")

SUPPORTED = (
    "supported: softmax or sigmoid top-k with or without renormalisation, with a selection bias, expert groups and"
    " a routed scaling factor (DeepSeek-V3), SparseMixer-v2 (PhiMoE), a shared expert with a sigmoid gate"
    " (Qwen2-MoE) or without one (DeepSeek-V3), a router bias (gpt-oss), SiLU-gated experts without biases or"
    " gpt-oss's biased experts with a clamped SwiGLU"
)


class UnsupportedBlock(Exception):
    """What a block has that ``MoELayer`` cannot represent exactly (one short phrase)."""


@dataclass(frozen=True)
class BlockSpec:
    """How one Hugging Face sparse-MoE block routes, in ``MoELayer`` terms."""

    router_name: str  # the router's attribute name in the block ("gate" or "router")
    num_experts: int
    top_k: int
    d_model: int
    ffn_hidden: int
    routing: str  # "softmax_topk", "sigmoid_topk" or "sparsemixer"
    renormalize: bool  # top-k: divide the chosen gates by their sum
    sparsemixer_eps: float  # sparsemixer: the jitter mask's eps (config.router_jitter_noise)
    input_jitter: float  # training noise on the block input (Mixtral, PhiMoE)
    shared_expert: bool  # Qwen2-MoE: a shared expert scaled by sigmoid(shared_expert_gate(x))
    scoring: Scoring = field(default_factory=Scoring)  # MoELayer's score function, expert groups and routed scaling factor
    selection_bias: str | None = None  # the router's e_score_correction_bias, by its name in the router
    shared_experts: bool = False  # DeepSeek-V3, ERNIE-4.5: shared_experts(x) added without a gate
    router_bias: bool = False  # gpt-oss: the router's logits are x W^T + bias
    # gpt-oss: experts with biases, interleaved gate/up columns and this clamped SwiGLU (hf.biased_experts)
    clamped_swiglu: Activation | None = None
    returns_router_scores: bool = False  # gpt-oss: the block returns (hidden_states, router_scores)

    def native_estimator(self) -> tuple[str, dict]:
        """The registered estimator (and its arguments) that reproduces the family's own routing."""
        return native_estimator(self.routing, self.renormalize, self.sparsemixer_eps)

    def build_native_estimator(self) -> Estimator:
        """An instance of :meth:`native_estimator`, routing with the family's :attr:`scoring`."""
        estimator = build_estimator(*self.native_estimator())
        estimator.use_scoring(self.scoring)
        return estimator

    def describe(self) -> str:
        return describe_routing(self.routing, self.renormalize, self.sparsemixer_eps, self.top_k) + describe_scoring(
            self.scoring
        ) + (", selection bias" if self.selection_bias else "") + (", router bias" if self.router_bias else "")


def native_estimator(routing: str, renormalize: bool, sparsemixer_eps: float) -> tuple[str, dict]:
    """The registered estimator (and its arguments) that computes one routing function exactly."""
    if routing == "sparsemixer":
        return "sparsemixer_v2", {"jitter_eps": sparsemixer_eps}
    return "topk", {"renormalize": renormalize}


def describe_routing(routing: str, renormalize: bool, sparsemixer_eps: float, top_k: int | str = "k") -> str:
    if routing == "sparsemixer":
        return f"SparseMixer-v2 top-{top_k} with jitter eps {sparsemixer_eps}"
    score = "sigmoid" if routing == "sigmoid_topk" else "softmax"
    return f"{score} top-{top_k}" + (" renormalised" if renormalize else "")


def find_blocks(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """Every module whose child ``experts`` holds a 3-D ``gate_up_proj`` parameter, in module order."""
    found = []
    for name, module in model.named_modules():
        experts = getattr(module, "experts", None)
        gate_up = getattr(experts, "gate_up_proj", None) if isinstance(experts, nn.Module) else None
        if isinstance(gate_up, nn.Parameter) and gate_up.dim() == 3:
            found.append((name, module))
    return found


def _router(block: nn.Module) -> tuple[str, nn.Module]:
    for name in ROUTER_NAMES:
        router = getattr(block, name, None)
        if isinstance(router, nn.Module) and isinstance(getattr(router, "weight", None), nn.Parameter):
            return name, router
    raise UnsupportedBlock(f"a router child named one of {ROUTER_NAMES} with a weight [E, D]")


def _check_experts(experts: nn.Module, num_experts: int, d_model: int) -> tuple[int, Activation | None]:
    """The expert hidden width F and, for gpt-oss-style experts, their clamped SwiGLU (else None), after checking
    the experts are exactly SiLU(x Wg) * (x Wu) Wd, or gpt-oss's (:mod:`lightning_moe.hf.biased_experts`)."""
    if has_biased_clamped_experts(experts):
        try:
            ffn_hidden, activation = check_biased_layout(experts, num_experts, d_model)
        except BiasedExpertsError as err:
            raise UnsupportedBlock(str(err)) from err
        check_expert_function(experts, ffn_hidden, d_model, activation)
        return ffn_hidden, activation
    extra = sorted(name for name, _ in experts.named_parameters() if name not in ("gate_up_proj", "down_proj"))
    extra += [f"limit={experts.limit}"] if hasattr(experts, "limit") else []
    if extra:
        raise UnsupportedBlock(f"biased or clamped SwiGLU experts ({', '.join(extra)}; gpt-oss style)")
    gate_up, down = experts.gate_up_proj, experts.down_proj
    two_f = gate_up.shape[1]
    if gate_up.shape != (num_experts, two_f, d_model) or two_f % 2 or down.shape != (num_experts, d_model, two_f // 2):
        raise UnsupportedBlock(
            f"an expert layout other than gate_up_proj [E, 2F, D] and down_proj [E, D, F]"
            f" (got {tuple(gate_up.shape)} and {tuple(down.shape)})"
        )
    act_fn = getattr(experts, "act_fn", None)
    probe = torch.linspace(-6, 6, 97)
    if not callable(act_fn) or not torch.allclose(act_fn(probe), F.silu(probe), rtol=1e-6, atol=1e-7):
        raise UnsupportedBlock(f"expert activation {type(act_fn).__name__} (only SiLU-gated experts)")
    check_expert_function(experts, two_f // 2, d_model)
    return two_f // 2, None


def check_expert_function(
    experts: nn.Module, ffn_hidden: int, d_model: int, clamped_swiglu: Activation | None = None
) -> None:
    """Run the block's own experts on a probe routed entirely to expert 0 with weight 1 and
    compare with silu(x Wg^T) * (x Wu^T) Wd^T from gate_up_proj's first F rows (gate), its
    last F rows (up) and down_proj: the reading of the weights conversion relies on. For
    gpt-oss-style experts (``clamped_swiglu`` given) the reading compared with is
    :func:`~lightning_moe.hf.biased_experts.expected_output`, on a probe that reaches the clamps.

    Experts on the meta device (a model built to be filled shard by shard) hold no values:
    a copy of them with random weights runs instead, as the router probe does; all its experts
    share one expert's weights, so checking a model of any size costs one expert.
    """
    if experts.gate_up_proj.is_meta:
        experts = _one_random_expert(experts)
    gate_up, down = experts.gate_up_proj, experts.down_proj
    x_TD = probe_inputs(d_model, 16)
    if clamped_swiglu is not None:
        x_TD = probe_reaching_clamps(x_TD, clamped_swiglu)
    x_TD = x_TD.to(gate_up.device, gate_up.dtype)
    index_T1 = torch.zeros(x_TD.shape[0], 1, dtype=torch.long, device=x_TD.device)
    with torch.no_grad():
        try:
            theirs = experts(x_TD, index_T1, torch.ones_like(index_T1, dtype=x_TD.dtype)).float()
        except Exception as err:  # foreign experts: whatever they raise is the reason for refusal
            raise UnsupportedBlock(
                f"experts that do not run as experts(hidden, top_k_index, top_k_weights)"
                f" ({type(err).__name__}: {first_line(err)})"
            ) from err
        if clamped_swiglu is not None:
            ours = expected_output(experts, clamped_swiglu, x_TD)
        else:
            gate, up, out = (w.float() for w in (gate_up[0, :ffn_hidden], gate_up[0, ffn_hidden:], down[0]))
            x_TD = x_TD.float()
            ours = (F.silu(x_TD @ gate.T) * (x_TD @ up.T)) @ out.T
    tolerance = 1e-4 if gate_up.dtype == torch.float32 else 3e-2
    if not torch.allclose(theirs, ours, rtol=tolerance, atol=tolerance * float(ours.abs().max())):
        if clamped_swiglu is not None:
            raise UnsupportedBlock(
                "biased experts that do not compute clamped_swiglu(x W_gate_up + b_gate_up) W_down + b_down from"
                " gate_up_proj (gate and up columns interleaved), down_proj and their biases"
            )
        raise UnsupportedBlock(
            "experts that do not compute silu(x W_gate) * (x W_up) W_down from gate_up_proj (gate rows first)"
            " and down_proj"
        )


def _one_random_expert(experts: nn.Module) -> nn.Module:
    """A float32 copy of ``experts`` whose experts all share one expert's random weights (a view,
    the memory of one expert): the probe routes every token to expert 0."""
    copied = copy.deepcopy(experts).float()
    generator = torch.Generator().manual_seed(2)
    for name, _ in experts.named_parameters(recurse=False):  # weights, and gpt-oss's biases
        shape = getattr(experts, name).shape
        weight = torch.randn((1, *shape[1:]), generator=generator) / shape[-1] ** 0.5
        setattr(copied, name, nn.Parameter(weight.expand(shape), requires_grad=False))
    return copied


def _routing_candidates(router: nn.Module, biased: bool) -> list[tuple[str, bool, float]]:
    """Every routing ``MoELayer`` represents exactly, as ``(routing, renormalize, sparsemixer eps)``.

    Mixtral's softmax over the chosen logits is softmax top-k renormalised, written
    differently. SparseMixer-v2's eps is a parameter the probe cannot be expected to pin
    down, so it is read from the router (PhiMoE: ``router_jitter_noise``); whether the
    router runs SparseMixer-v2 at all is still the probe's to say. So are, for sigmoid
    top-k, the expert groups and the routed scaling factor (:func:`router_scoring`).
    SparseMixer-v2 is no candidate for a router with a selection bias or groups.
    """
    candidates = [(routing, renormalize, 0.0) for routing in ("softmax_topk", "sigmoid_topk") for renormalize in (True, False)]
    eps = getattr(router, "router_jitter_noise", None)
    plain = not biased and not router_bias_of(router) and router_scoring(router, "softmax").is_softmax_top_k
    if plain and isinstance(eps, (int, float)) and not isinstance(eps, bool) and eps > 0:
        candidates.append(("sparsemixer", False, float(eps)))
    return candidates


def router_bias_of(router: nn.Module) -> bool:
    """Whether ``router`` holds a logit bias [E] (gpt-oss: ``bias``); whether its logits use it is the probe's to say."""
    bias = getattr(router, "bias", None)
    if bias is None:
        return False
    if not isinstance(bias, Tensor) or bias.numel() != router.weight.shape[0]:
        raise UnsupportedBlock("a router bias without one entry per expert")
    return True


def run_router_probe(router: nn.Module, bias_name: str | None = None) -> tuple[Tensor, tuple[Tensor, Tensor]]:
    """The logits [T, E] and the (weights, indices) [T, K] (sorted by expert) that a float32 copy of
    ``router`` computes in eval on a random probe, with random weights (and a random logit bias where
    the router holds one, :func:`router_bias_of`).

    Random weights, not the router's own: what is decided is the routing *function*, and a
    router freshly built with zeros would show ties and nothing else. Logits of spread about
    2 give every candidate distinct weights: some tokens keep several experts under
    SparseMixer's jitter mask, others one. The router's selection bias (``bias_name``) is
    random too (:func:`probe_selection_bias`).
    """
    num_experts, d_model = router.weight.shape
    reference = copy.deepcopy(router).float().eval()
    weight_ED = torch.randn(num_experts, d_model, generator=torch.Generator().manual_seed(1)) * (2 / d_model**0.5)
    reference.weight = nn.Parameter(weight_ED, requires_grad=False)
    logit_bias_E = torch.zeros(num_experts)
    if router_bias_of(router):
        logit_bias_E = torch.randn(num_experts, generator=torch.Generator().manual_seed(4))
        reference.bias = nn.Parameter(logit_bias_E.clone(), requires_grad=False)
    if bias_name is not None:
        write_selection_bias(reference, bias_name, probe_selection_bias(num_experts))
    x_TD = probe_inputs(d_model)
    try:
        with torch.no_grad():
            out = reference(x_TD.clone())  # a copy: some routers scale their input in place
    except Exception as err:  # a foreign router: whatever it raises is the reason for refusal
        raise UnsupportedBlock(
            f"a router that does not run as router(hidden_states) ({type(err).__name__}: {first_line(err)})"
        ) from err
    if not (isinstance(out, tuple) and len(out) == 3 and all(isinstance(t, Tensor) for t in out)):
        raise UnsupportedBlock("a router that returns (logits, weights, indices)")
    logits_TE, weights_TK, indices_TK = out
    expected_TE = x_TD @ weight_ED.T + logit_bias_E
    if logits_TE.shape != expected_TE.shape or not torch.allclose(logits_TE.float(), expected_TE, rtol=1e-5, atol=1e-5):
        bias = " + bias" if router_bias_of(router) else ""
        raise UnsupportedBlock(f"a router whose logits are not hidden_states @ weight.T{bias}")
    if weights_TK.shape != indices_TK.shape or weights_TK.dim() != 2 or weights_TK.shape[0] != x_TD.shape[0]:
        raise UnsupportedBlock("a router whose weights and indices are not both [tokens, top_k]")
    return logits_TE.float(), _sorted_by_expert(weights_TK.float(), indices_TK.long())


def routing_of(router: nn.Module) -> tuple[str, bool, float, int, Scoring, str | None]:
    """``(routing, renormalize, sparsemixer eps, top_k, scoring, selection bias name)`` of ``router``:
    the first candidate routing that computes, from the probe's logits (with the router's logit bias,
    if it holds one) and selection bias, exactly the weights and experts the router itself chose."""
    try:
        bias_name = selection_bias_name(router)
        candidates = _routing_candidates(router, bias_name is not None)
        grouped = router_scoring(router, "sigmoid")
    except ScoredRoutingError as err:
        raise UnsupportedBlock(str(err)) from err
    # A router may hold group settings it does not use (DeepSeek-V2's greedy top-k): try both.
    group_choices = [(grouped.n_group, grouped.topk_group)] + ([(1, 1)] if grouped.n_group > 1 else [])
    logits_TE, theirs = run_router_probe(router, bias_name)
    bias_E = None if bias_name is None else probe_selection_bias(logits_TE.shape[1])
    top_k = theirs[1].shape[1]
    for (routing, renormalize, eps), (n_group, topk_group) in itertools.product(candidates, group_choices):
        scoring = Scoring()
        if routing != "sparsemixer":
            scoring = replace(grouped, score_function=routing.partition("_")[0], n_group=n_group, topk_group=topk_group)
        if top_k > scoring.topk_group * (logits_TE.shape[1] // scoring.n_group):
            continue
        estimator = build_estimator(*native_estimator(routing, renormalize, eps))
        estimator.use_scoring(scoring)
        if routings_agree(eval_routing(estimator, logits_TE, top_k, bias_E), theirs):
            return routing, renormalize, eps, top_k, scoring, bias_name
    tried = ", ".join(describe_routing(*candidate, top_k) for candidate in candidates)
    settings = ", ".join(filter(None, [describe_scoring(grouped)[2:], "a selection bias" if bias_name else ""]))
    settings = f" (with {settings})" if settings else ""
    raise UnsupportedBlock(f"a router whose output is none of {tried}{settings} of its logits")


def _check_children(block: nn.Module, router_name: str) -> bool:
    """Whether the block has a (gated) shared expert, after checking it has nothing else."""
    known = {router_name, "experts", SHARED_EXPERT, SHARED_EXPERT_GATE, SHARED_EXPERTS}
    extra = sorted(set(dict(block.named_children())) - known)
    if extra:
        kinds = ", ".join(f"{name} ({type(getattr(block, name)).__name__})" for name in extra)
        raise UnsupportedBlock(
            f"extra submodules {kinds} (only a shared expert with a sigmoid gate or shared experts without one"
            " are supported)"
        )
    own = [name for name, _ in (*block.named_parameters(recurse=False), *block.named_buffers(recurse=False))]
    if own:  # the conversion keeps only the children's tensors
        raise UnsupportedBlock(f"tensors of its own ({', '.join(own)})")
    has_shared = hasattr(block, SHARED_EXPERT)
    if has_shared != hasattr(block, SHARED_EXPERT_GATE):
        raise UnsupportedBlock("a shared expert without its sigmoid gate")
    return has_shared


def inspect_block(block: nn.Module) -> BlockSpec:
    """The :class:`BlockSpec` of one block, or :class:`UnsupportedBlock` naming everything missing."""
    router_name, router = _router(block)
    num_experts, d_model = router.weight.shape
    missing = []

    def attempt(check, *args):
        try:
            return check(*args)
        except UnsupportedBlock as err:
            missing.append(str(err))

    routing = attempt(routing_of, router)
    experts = attempt(_check_experts, block.experts, num_experts, d_model)
    has_shared = attempt(_check_children, block, router_name)
    try:
        ungated_shared = has_ungated_shared_experts(block)
    except ScoredRoutingError as err:
        missing.append(str(err))
    if missing:
        raise UnsupportedBlock(" and ".join(missing))
    ffn_hidden, clamped_swiglu = experts
    return BlockSpec(
        router_name=router_name,
        num_experts=num_experts,
        top_k=routing[3],
        d_model=d_model,
        ffn_hidden=ffn_hidden,
        routing=routing[0],
        renormalize=routing[1],
        sparsemixer_eps=routing[2],
        input_jitter=float(getattr(block, "jitter_noise", 0.0) or getattr(block, "input_jitter_noise", 0.0) or 0.0),
        shared_expert=has_shared,
        scoring=routing[4],
        selection_bias=routing[5],
        shared_experts=ungated_shared,
        router_bias=router_bias_of(router),
        clamped_swiglu=clamped_swiglu,
        returns_router_scores=returns_router_scores(block, d_model),
    )


def returns_router_scores(block: nn.Module, d_model: int) -> bool:
    """Whether ``block`` returns ``(hidden_states, router_scores)`` (gpt-oss's MLP) rather than a tensor.

    Decided by running the block on two tokens (the random streams left as they were); a block on the
    meta device (no values to run) is taken to return the pair when its experts are gpt-oss-style, the
    one family in ``transformers`` whose block does.
    """
    if any(p.is_meta for p in block.parameters()):
        return has_biased_clamped_experts(block.experts)
    first = next(block.parameters())
    x_BTD = probe_inputs(d_model, 2)[None].to(first.device, first.dtype)
    devices = [first.device.index] if first.device.type == "cuda" else []
    # The RNG is restored after: a block that samples or jitters in training must not move the caller's streams.
    with torch.no_grad(), torch.random.fork_rng(devices=devices):
        try:
            out = block(x_BTD)
        except Exception as err:  # a foreign block: whatever it raises is the reason for refusal
            raise UnsupportedBlock(
                f"a block that does not run as block(hidden_states) ({type(err).__name__}: {first_line(err)})"
            ) from err
    return isinstance(out, tuple)


def build_estimator(name: str, args: dict) -> Estimator:
    return ESTIMATOR_REGISTRY.get(name, **args)


def eval_routing(
    estimator: Estimator, logits_TE: Tensor, top_k: int, selection_bias: Tensor | None = None
) -> tuple[Tensor, Tensor]:
    """``estimator``'s evaluation routing of ``logits_TE`` (with ``selection_bias`` [E], if given):
    (weights, indices), each row sorted by expert."""
    was_training = estimator.training
    estimator.eval()
    bias = {} if selection_bias is None else {"selection_bias": selection_bias}
    try:
        with torch.no_grad():
            routing = estimator.route(logits_TE.float(), top_k, **bias)
    finally:
        estimator.train(was_training)
    return _sorted_by_expert(routing.weights.float(), routing.indices)


def _sorted_by_expert(weights_TK: Tensor, indices_TK: Tensor) -> tuple[Tensor, Tensor]:
    indices_TK, order_TK = indices_TK.sort(dim=-1)
    return weights_TK.gather(-1, order_TK), indices_TK


def routings_agree(a: tuple[Tensor, Tensor], b: tuple[Tensor, Tensor]) -> bool:
    return torch.equal(a[1], b[1]) and torch.allclose(a[0], b[0], rtol=1e-5, atol=1e-7)


def probe_inputs(d_model: int, num_tokens: int = 64) -> Tensor:
    return torch.randn(num_tokens, d_model, generator=torch.Generator().manual_seed(0))
