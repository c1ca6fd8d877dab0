"""Routing statistics of a Hugging Face MoE folder on task conversations: how routing changed
against a base model, how sure each router is, and how much the chosen expert says about the task.

The post-training study asks two questions of routing that validation loss cannot answer: did
fine-tuning move tokens to other experts (*routing change*: the share of tokens whose top-k expert
set differs between the post-trained model and its base), and had the base's routers specialised
by task before it (*entropy* of each token's router distribution and the *mutual information*
between an example's task kind and the experts its tokens are sent to). :func:`routing_statistics`
answers both from one forward pass per model over the held-out conversations (prompt and right
answer, rendered with the tokenizer's chat template) with ``output_router_logits=True``.

Per MoE layer, over every non-padding token (T tokens, E experts, k experts per token):

* ``routing_change``: share of the T tokens whose set of k chosen experts differs (with a base);
* ``token_entropy``: mean over tokens of H(softmax(router logits)), in nats (at most log E);
* ``kind_expert_mi``: I(kind; expert) = H(expert) - H(expert | kind), in nats, each of a token's
  k choices counted as one (kind, expert) sample; ``kind_expert_mi_normalised`` divides it by
  log(min(kinds, E)), its largest possible value, so 1 means every kind has experts of its own.

Each value is also averaged over the MoE layers. The models run under plain ``transformers``
(imported inside the functions, so importing this module never imports it). The chosen experts
are the top-k of the router logits, as the softmax top-k families select (OLMoE, Mixtral,
Qwen2/3-MoE, PhiMoE at eval, gpt-oss); families that select by sigmoid scores with a
bias or groups (DeepSeek-V3, GLM-4.5) are refused rather than measured with the wrong selection.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from lightning_moe.data.sft_tasks import TaskExample
from lightning_moe.errors import ConfigError

if TYPE_CHECKING:
    from lightning_moe.study.exact_match import GenerationEval

__all__ = ["TOPK_OF_LOGITS_FAMILIES", "check_routing_folder", "kind_expert_mutual_information", "routing_statistics",
           "routing_statistics_saved"]

#: model_types whose routers choose the top-k experts of the logits ``output_router_logits`` returns.
TOPK_OF_LOGITS_FAMILIES = ("gpt_oss", "mixtral", "olmoe", "phimoe", "qwen2_moe", "qwen3_moe")
_PER_LAYER = ("token_entropy", "kind_expert_mi", "kind_expert_mi_normalised", "routing_change")


def kind_expert_mutual_information(counts_KE: torch.Tensor) -> float:
    """I(kind; expert) in nats from a table of (kind, expert) sample counts [kinds, experts].

    I = H(expert) - H(expert | kind) = sum_ke p(k, e) log(p(k, e) / (p(k) p(e))); empty cells add 0.
    """
    p_KE = counts_KE.double() / counts_KE.sum()
    p_K, p_E = p_KE.sum(1, keepdim=True), p_KE.sum(0, keepdim=True)
    terms = p_KE * torch.log(p_KE / (p_K * p_E))
    return float(torch.where(p_KE > 0, terms, torch.zeros_like(terms)).sum())


class _LayerTally:
    """Running sums over the tokens of one MoE layer: entropy, (kind, expert) counts, changed sets."""

    def __init__(self, num_kinds: int, num_experts: int):
        self.entropy_sum, self.changed, self.tokens = 0.0, 0, 0
        self.counts_KE = torch.zeros(num_kinds, num_experts, dtype=torch.float64)

    def add(self, logits_TE: torch.Tensor, kinds_T: torch.Tensor, top_k: int) -> torch.Tensor:
        """Count these tokens; returns their chosen experts [T, k]."""
        logp_TE = torch.log_softmax(logits_TE.double(), dim=-1)
        self.entropy_sum += float(-(logp_TE.exp() * logp_TE).sum())
        self.tokens += logits_TE.shape[0]
        chosen_TK = logits_TE.topk(top_k, dim=-1).indices
        num_experts = self.counts_KE.shape[1]
        cells = (kinds_T[:, None] * num_experts + chosen_TK).reshape(-1)
        self.counts_KE += torch.bincount(cells.cpu(), minlength=self.counts_KE.numel()).view_as(self.counts_KE)
        return chosen_TK

    def compare(self, chosen_TK: torch.Tensor, base_chosen_TK: torch.Tensor, num_experts: int) -> None:
        """Count the tokens whose set of chosen experts differs from the base's (order within a set aside)."""
        def as_set(chosen: torch.Tensor) -> torch.Tensor:
            return torch.zeros(chosen.shape[0], num_experts, dtype=torch.bool, device=chosen.device).scatter_(1, chosen, True)

        self.changed += int((as_set(chosen_TK) != as_set(base_chosen_TK)).any(dim=1).sum())

    def result(self, with_change: bool) -> dict[str, float]:
        num_kinds, num_experts = self.counts_KE.shape
        mi = kind_expert_mutual_information(self.counts_KE)
        ceiling = math.log(min(num_kinds, num_experts))
        out = {"token_entropy": self.entropy_sum / self.tokens, "kind_expert_mi": mi,
               "kind_expert_mi_normalised": mi / ceiling if ceiling > 0 else 0.0}
        if with_change:
            out["routing_change"] = self.changed / self.tokens
        return out


def check_routing_folder(folder: str | None, field: str) -> None:
    """A folder that is no model, or of a family selected otherwise than by top-k, refused in one line."""
    if folder is None:
        return
    if not (Path(folder) / "config.json").is_file():
        raise ConfigError(f"{field}={folder!r} is not a Hugging Face model folder (no config.json in it)")
    import transformers

    model_type = transformers.AutoConfig.from_pretrained(folder).model_type
    if model_type not in TOPK_OF_LOGITS_FAMILIES:
        raise ConfigError(
            f"{field}={folder!r}: routing statistics need a router that picks the top-k of its logits; "
            f"model_type {model_type!r} does not (use one of {', '.join(TOPK_OF_LOGITS_FAMILIES)})"
        )


def _load(folder: str, field: str, device: str) -> tuple[Any, Any]:
    """The folder's model (eval, on ``device``) and tokenizer; a folder lacking weights refused in one line.

    transformers would start missing weights at random and carry on: routing statistics of such a
    model mean nothing. Its load report is kept quiet (error level) while loading, so the one line
    is all that shows.
    """
    import transformers

    verbosity = transformers.logging.get_verbosity()
    transformers.logging.set_verbosity_error()
    try:
        model, loading = transformers.AutoModelForCausalLM.from_pretrained(folder, output_loading_info=True)
    finally:
        transformers.logging.set_verbosity(verbosity)
    if loading["missing_keys"]:
        missing = sorted(loading["missing_keys"])
        raise ConfigError(f"{field}={folder!r} lacks {len(missing)} of its model's weights (e.g. {missing[0]}); "
                          "give a folder saved whole (save_pretrained, lightning-moe export)")
    model = model.to(device).eval()
    return model, transformers.AutoTokenizer.from_pretrained(folder)


def _token_ids(tokenizer: Any, examples: list[TaskExample], folder: str, field: str) -> list[list[int]]:
    """Each example's whole conversation (prompt and right answer) as the chat template renders it."""
    if not getattr(tokenizer, "chat_template", None):
        raise ConfigError(f"{field}={folder!r} has no tokenizer with a chat template, which renders the conversations")
    texts = [tokenizer.apply_chat_template(e.messages(), tokenize=False) for e in examples]
    return [tokenizer(text, add_special_tokens=False)["input_ids"] for text in texts]


def _router_logits(model: Any, rows: list[list[int]], device: str) -> tuple[list[torch.Tensor], torch.Tensor]:
    """Every MoE layer's router logits [T, E] for the rows' real tokens, and the mask that picked them.

    Rows are right-padded, so each real token sees exactly the tokens it sees alone (causal
    attention, positions from 0); transformers returns one [batch * length, E] tensor per MoE
    layer, padding included, which the attention mask then drops.
    """
    length = max(map(len, rows))
    input_ids = torch.zeros(len(rows), length, dtype=torch.long)
    mask = torch.zeros(len(rows), length, dtype=torch.long)
    for i, row in enumerate(rows):
        input_ids[i, : len(row)], mask[i, : len(row)] = torch.tensor(row), 1
    with torch.no_grad():
        out = model(input_ids=input_ids.to(device), attention_mask=mask.to(device), output_router_logits=True,
                    use_cache=False)
    keep = mask.reshape(-1).bool().to(device)
    return [logits.reshape(-1, logits.shape[-1])[keep].float() for logits in out.router_logits], mask


def _shape(model: Any) -> tuple[int, int]:
    """(experts, experts per token) from the model's config, whatever the family calls them."""
    config = model.config
    experts = next(getattr(config, n) for n in ("num_experts", "num_local_experts", "n_routed_experts")
                   if getattr(config, n, None))
    return int(experts), int(config.num_experts_per_tok)


def routing_statistics(model_folder: str, examples: list[TaskExample], base_folder: str | None = None,
                       batch_size: int = 32, device: str = "auto") -> dict[str, Any]:
    """Routing statistics of ``model_folder`` on ``examples``' conversations (see the module's doc).

    With ``base_folder``, also ``routing_change`` against it and the base's own statistics
    (``"base"``). Both folders must tokenize the conversations alike and have the same experts.
    Returns ``{"model", "base_model", "tokens", "num_experts", "top_k", "kinds", "layers": [per MoE
    layer], <each statistic averaged over the layers>, "base": {...}}``.
    """
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ConfigError(f"batch_size={batch_size!r} must be a positive integer")
    if not examples:
        raise ConfigError("routing statistics need at least one example conversation; none were given")
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    check_routing_folder(model_folder, "model")
    check_routing_folder(base_folder, "routing_base")  # both folders before either loads
    model, tokenizer = _load(model_folder, "model", device)
    num_experts, top_k = _shape(model)
    rows = _token_ids(tokenizer, examples, model_folder, "model")
    base = None
    if base_folder is not None:
        base, base_tokenizer = _load(base_folder, "routing_base", device)
        if _shape(base) != (num_experts, top_k):
            raise ConfigError(f"routing_base={base_folder!r} has (experts, experts per token) {_shape(base)}; "
                              f"model={model_folder!r} has {(num_experts, top_k)}")
        if _token_ids(base_tokenizer, examples, base_folder, "routing_base") != rows:
            raise ConfigError(f"routing_base={base_folder!r} tokenizes the conversations differently from "
                              f"model={model_folder!r}; routing can only be compared token by token")
    kinds = sorted({e.kind for e in examples})
    kind_ids = [kinds.index(e.kind) for e in examples]
    tallies: list[_LayerTally] = []
    base_tallies: list[_LayerTally] = []
    # Longest first, so each batch pads little and the first one shows the most memory it needs.
    order = sorted(range(len(rows)), key=lambda i: -len(rows[i]))
    for start in range(0, len(order), batch_size):
        batch = order[start : start + batch_size]
        layers, mask = _router_logits(model, [rows[i] for i in batch], device)
        kinds_T = (torch.tensor([kind_ids[i] for i in batch])[:, None] * mask)[mask.bool()].to(device)
        tallies = tallies or [_LayerTally(len(kinds), num_experts) for _ in layers]
        chosen = [tally.add(logits, kinds_T, top_k) for tally, logits in zip(tallies, layers)]
        if base is None:
            continue
        base_layers, _ = _router_logits(base, [rows[i] for i in batch], device)
        if len(base_layers) != len(layers):
            raise ConfigError(f"routing_base={base_folder!r} has {len(base_layers)} MoE layers; "
                              f"model={model_folder!r} has {len(layers)}")
        base_tallies = base_tallies or [_LayerTally(len(kinds), num_experts) for _ in base_layers]
        for tally, base_tally, chosen_TK, logits in zip(tallies, base_tallies, chosen, base_layers):
            tally.compare(chosen_TK, base_tally.add(logits, kinds_T, top_k), num_experts)
    result = {"model": str(model_folder), "base_model": None if base is None else str(base_folder),
              "tokens": tallies[0].tokens, "num_experts": num_experts, "top_k": top_k, "kinds": kinds,
              **_summary([t.result(base is not None) for t in tallies])}
    if base is not None:
        result["base"] = _summary([t.result(False) for t in base_tallies])
    return result


def _summary(layers: list[dict[str, float]]) -> dict[str, Any]:
    """The per-layer statistics and each one's mean over the layers."""
    names = [name for name in _PER_LAYER if name in layers[0]]
    return {"layers": layers, **{name: sum(layer[name] for layer in layers) / len(layers) for name in names}}


def routing_statistics_saved(model_folder: str, settings: GenerationEval, base_folder: str | None,
                             result_file: Path) -> dict[str, Any]:
    """:func:`routing_statistics` on ``settings``' held-out examples (the ones exact match asks), kept in
    ``result_file`` and reused while the folders and settings are the same and neither folder was
    written again since (a run exported anew from a newer checkpoint is measured anew)."""
    asked = {"settings": asdict(settings), "base_model": base_folder}
    folders = [Path(f) / "config.json" for f in (model_folder, base_folder) if f is not None]
    if result_file.is_file() and all(f.is_file() and f.stat().st_mtime <= result_file.stat().st_mtime for f in folders):
        kept = json.loads(result_file.read_text())
        if kept.get("model") == str(model_folder) and kept.get("asked") == asked:
            return kept
    examples = settings.task_set().examples("held_out", settings.num_prompts, settings.seed)
    result = {"asked": asked, **routing_statistics(model_folder, examples, base_folder, settings.batch_size,
                                                   settings.device)}
    result_file.write_text(json.dumps(result, indent=1))
    return result
