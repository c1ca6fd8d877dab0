"""Routing statistics of a Hugging Face folder against brute force: router logits recomputed by hand
from the hidden states entering each router, conversation by conversation with no padding, top-k
sets and entropies counted in float64, mutual information from (kind, expert) samples with numpy."""

import json
import math
import os
import shutil
from collections import Counter

import numpy as np
import pytest
import torch

transformers = pytest.importorskip("transformers")

from lightning_moe.cli import main
from lightning_moe.data.sft_tasks import TaskSet
from lightning_moe.errors import ConfigError
from lightning_moe.hf.tiny import build_tiny_model
from lightning_moe.study.exact_match import GenerationEval, evaluate_study_runs
from lightning_moe.study.routing_stats import kind_expert_mutual_information, routing_statistics

TASKS = "synthetic:tasks?kinds=arithmetic,lookup,reverse&difficulty=2"
TOPK_FAMILIES = ("olmoe", "qwen3_moe", "qwen2_moe", "mixtral", "phimoe")


def numpy_mutual_information(samples):
    """I(kind; expert) in nats straight from its definition over a list of (kind, expert) samples."""
    n = len(samples)
    joint, kinds, experts = Counter(samples), Counter(k for k, _ in samples), Counter(e for _, e in samples)
    return float(sum(c / n * np.log((c / n) / (kinds[k] / n * experts[e] / n)) for (k, e), c in joint.items()))


def test_mutual_information_against_its_definition():
    rng = np.random.default_rng(0)
    samples = [(int(k), int(e)) for k, e in zip(rng.integers(0, 3, 500), rng.integers(0, 5, 500))]
    samples += [(0, 1)] * 40 + [(2, 4)] * 25  # some dependence
    counts = torch.zeros(3, 5)
    for k, e in samples:
        counts[k, e] += 1
    assert kind_expert_mutual_information(counts) == pytest.approx(numpy_mutual_information(samples), rel=1e-12)
    # Kinds with experts of their own: I = H(kind) = log 3; independent kind and expert: I = 0.
    assert kind_expert_mutual_information(torch.diag(torch.full((3,), 7.0))) == pytest.approx(math.log(3))
    assert kind_expert_mutual_information(torch.ones(3, 5)) == pytest.approx(0.0, abs=1e-15)


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("routing")
    return {family: build_tiny_model(family, str(root / family)) for family in TOPK_FAMILIES + ("glm4_moe",)}


def examples(n=12, seed=3):
    return TaskSet.parse(TASKS).examples("held_out", n, seed)


def brute_force(folder, examples):
    """Per MoE layer: each real token's router logits [T, E] in float64 (computed by hand from the
    hidden states entering the router), and each token's kind index; one conversation at a time.
    Checks on the way that the experts each router itself selects are the top k of those logits."""
    tokenizer = transformers.AutoTokenizer.from_pretrained(folder)
    model = transformers.AutoModelForCausalLM.from_pretrained(folder).eval()
    routers = [m for m in model.modules() if type(m).__name__.lower().endswith("topkrouter")]
    assert len(routers) == model.config.num_hidden_layers
    captured, k = [], model.config.num_experts_per_tok

    def by_hand(router, args, out):
        logits = args[0].reshape(-1, args[0].shape[-1]).double() @ router.weight.double().T
        assert [frozenset(row) for row in out[2].tolist()] == topk_sets(logits, k)  # the router's own selection
        captured.append(logits)

    hooks = [r.register_forward_hook(by_hand) for r in routers]
    logits, kinds = [[] for _ in routers], []
    names = sorted({e.kind for e in examples})
    for example in examples:
        text = tokenizer.apply_chat_template(example.messages(), tokenize=False)
        ids = tokenizer(text, add_special_tokens=False, return_tensors="pt")["input_ids"]
        captured.clear()
        with torch.no_grad():
            model(input_ids=ids)
        for layer, value in zip(logits, captured):
            layer.append(value)
        kinds += [names.index(example.kind)] * ids.shape[1]
    for hook in hooks:
        hook.remove()
    return [torch.cat(layer) for layer in logits], kinds, k


def topk_sets(logits_TE, k):
    return [frozenset(row) for row in logits_TE.topk(k, dim=-1).indices.tolist()]


@pytest.mark.parametrize("family", TOPK_FAMILIES)
def test_entropy_and_mutual_information_equal_brute_force(folders, family):
    chosen = examples()
    result = routing_statistics(folders[family], chosen, batch_size=5)  # uneven batches: padding in each
    layers, kinds, k = brute_force(folders[family], chosen)
    assert result["tokens"] == len(kinds) and len(result["layers"]) == len(layers) and result["top_k"] == k
    for got, logits in zip(result["layers"], layers):
        p = torch.softmax(logits, -1)
        assert got["token_entropy"] == pytest.approx(float(-(p * p.log()).sum(-1).mean()), rel=1e-5)
        samples = [(kind, e) for kind, s in zip(kinds, topk_sets(logits, k)) for e in s]
        assert got["kind_expert_mi"] == pytest.approx(numpy_mutual_information(samples), rel=1e-6)
        assert got["kind_expert_mi_normalised"] == pytest.approx(got["kind_expert_mi"] / math.log(3))
    assert result["token_entropy"] == pytest.approx(np.mean([layer["token_entropy"] for layer in result["layers"]]))
    assert "routing_change" not in result and "base" not in result


def test_padding_does_not_count(folders):
    chosen = examples(9)
    alone, batched = (routing_statistics(folders["olmoe"], chosen, batch_size=b) for b in (1, 9))
    assert alone["tokens"] == batched["tokens"]
    for a, b in zip(alone["layers"], batched["layers"]):
        assert a["kind_expert_mi"] == pytest.approx(b["kind_expert_mi"], rel=1e-9)
        assert a["token_entropy"] == pytest.approx(b["token_entropy"], rel=1e-6)


def rewrite(folder, output, edit):
    """A copy of the model folder with ``edit(model)`` applied to its weights."""
    model = transformers.AutoModelForCausalLM.from_pretrained(folder)
    with torch.no_grad():
        edit(model)
    model.save_pretrained(output)
    transformers.AutoTokenizer.from_pretrained(folder).save_pretrained(output)
    return str(output)


def test_routing_change_counts_exactly_the_tokens_whose_set_changed(folders, tmp_path):
    chosen, a, b = examples(), 2, 5

    def swap_experts(model):  # experts a and b trade places in layer 0, gate rows and weights alike
        mlp = model.model.layers[0].mlp
        for tensor in (mlp.gate.weight, mlp.experts.gate_up_proj, mlp.experts.down_proj):
            tensor[[a, b]] = tensor[[b, a]].clone()

    swapped = rewrite(folders["olmoe"], tmp_path / "swapped", swap_experts)
    itself = routing_statistics(folders["olmoe"], chosen, base_folder=folders["olmoe"], batch_size=4)
    assert itself["routing_change"] == 0.0 and all(layer["routing_change"] == 0.0 for layer in itself["layers"])
    assert itself["base"]["layers"] == [{n: v for n, v in layer.items() if n != "routing_change"}
                                        for layer in itself["layers"]]

    result = routing_statistics(swapped, chosen, base_folder=folders["olmoe"], batch_size=4)
    base_layers, _, k = brute_force(folders["olmoe"], chosen)
    swapped_layers, _, _ = brute_force(swapped, chosen)
    # By hand: a token's set changes exactly when it holds one of the two swapped experts, not both.
    by_hand = sum(len(s & {a, b}) == 1 for s in topk_sets(base_layers[0], k)) / base_layers[0].shape[0]
    assert 0 < by_hand < 1 and result["layers"][0]["routing_change"] == pytest.approx(by_hand, abs=1e-12)
    for got, base_logits, logits in zip(result["layers"], base_layers, swapped_layers):
        changed = [x != y for x, y in zip(topk_sets(base_logits, k), topk_sets(logits, k))]
        assert got["routing_change"] == pytest.approx(sum(changed) / len(changed), abs=1e-12)
    assert result["layers"][1]["routing_change"] == 0.0  # layer 0's output is the same, so layer 1 routes alike
    assert result["routing_change"] == pytest.approx(by_hand / 2)


def test_zero_router_weights_give_the_largest_entropy(folders, tmp_path):
    def zero_routers(model):
        for layer in model.model.layers:
            layer.mlp.gate.weight.zero_()

    result = routing_statistics(rewrite(folders["olmoe"], tmp_path / "zero", zero_routers), examples(4))
    assert [layer["token_entropy"] for layer in result["layers"]] == pytest.approx([math.log(8)] * 2, rel=1e-12)


def test_a_sigmoid_routed_family_is_refused_in_one_line(folders):
    with pytest.raises(ConfigError, match=r"^routing_base=.*: routing statistics need a router that picks the top-k "
                                          r"of its logits; model_type 'glm4_moe' does not \(use one of .*olmoe"):
        routing_statistics(folders["olmoe"], examples(2), base_folder=folders["glm4_moe"])


def test_command_prints_routing_and_writes_it(folders, tmp_path, capsys):
    output = tmp_path / "result.json"
    main(["evaluate-generation", folders["olmoe"], "--tasks", TASKS, "--num_prompts", "3", "--max_new_tokens", "2",
          "--routing_base", folders["olmoe"], "--output", str(output)])
    out = capsys.readouterr().out
    assert out.startswith("exact match ") and "routing change vs base 0.0000" in out and "layer 1:" in out
    routing = json.loads(output.read_text())["routing"]
    assert routing["routing_change"] == 0.0 and routing["base_model"] == folders["olmoe"]
    assert len(routing["layers"]) == 2 and routing["tokens"] > 0


def test_command_scores_a_sigmoid_routed_model_and_says_why_routing_is_missing(folders, tmp_path, capsys):
    output = tmp_path / "result.json"
    main(["evaluate-generation", folders["glm4_moe"], "--tasks", TASKS, "--num_prompts", "2", "--max_new_tokens", "2",
          "--output", str(output)])
    assert "\nrouting not measured: model=" in capsys.readouterr().out
    written = json.loads(output.read_text())
    assert written["total"] == 2 and written["routing"] is None
    with pytest.raises(SystemExit) as exit_:  # asked for routing against a base: refused before generating
        main(["evaluate-generation", folders["glm4_moe"], "--tasks", TASKS, "--routing_base", folders["olmoe"]])
    err = capsys.readouterr().err
    assert exit_.value.code == 2 and err.startswith("error: model=") and "model_type 'glm4_moe'" in err


def test_a_folder_lacking_weights_or_a_chat_template_is_refused_in_one_line(folders, tmp_path):
    no_weights, no_template = tmp_path / "no_weights", tmp_path / "no_template"
    for copy in (no_weights, no_template):
        shutil.copytree(folders["olmoe"], copy)
    (no_weights / "model.safetensors").unlink()
    torch.save({}, no_weights / "pytorch_model.bin")  # transformers would start every weight at random
    (no_template / "chat_template.jinja").unlink()
    config = json.loads((no_template / "tokenizer_config.json").read_text())
    config.pop("chat_template", None)
    (no_template / "tokenizer_config.json").write_text(json.dumps(config))
    with pytest.raises(ConfigError, match=r"^routing_base=.*no_weights' lacks \d+ of its model's weights \(e.g. "):
        routing_statistics(folders["olmoe"], examples(2), base_folder=str(no_weights))
    with pytest.raises(ConfigError, match=r"^model=.*no_template' has no tokenizer with a chat template"):
        routing_statistics(str(no_template), examples(2))


def test_a_routing_base_without_a_model_is_one_line(folders, tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["evaluate-generation", folders["olmoe"], "--tasks", TASKS, "--routing_base", str(tmp_path)])
    assert exit_.value.code == 2
    assert capsys.readouterr().err == (f"error: routing_base={str(tmp_path)!r} is not a Hugging Face model folder "
                                       "(no config.json in it)\n")


def study_run(tmp_path, folder):
    """A finished study run whose exported folder is a copy of ``folder`` (newer than its checkpoint)."""
    run_dir = tmp_path / "runs" / "topk" / "seed_0"
    (run_dir / "checkpoints").mkdir(parents=True)
    (run_dir / "checkpoints" / "last.ckpt").write_bytes(b"")
    os.utime(run_dir / "checkpoints" / "last.ckpt", (0, 0))  # older than the export: nothing is exported
    shutil.copytree(folder, run_dir / "hf")
    return {"status": "done", "run_dir": str(run_dir), "metrics": {}}


def test_study_runs_get_routing_change_against_the_base_and_keep_it(folders, tmp_path):
    runs = [study_run(tmp_path, folders["olmoe"])]
    run_dir = tmp_path / "runs" / "topk" / "seed_0"
    settings = GenerationEval(TASKS, seed=1, num_prompts=4, max_new_tokens=2)
    base = evaluate_study_runs(runs, settings, folders["olmoe"], tmp_path)
    metrics = runs[0]["metrics"]
    saved = json.loads((run_dir / "routing_stats.json").read_text())
    # The run is a copy of the base: no token changed its experts, and both have the same statistics.
    assert metrics["routing_change"] == 0.0 and metrics["routing_change_per_layer"] == [0.0, 0.0]
    assert metrics["routing_entropy_tasks"] == pytest.approx(base["token_entropy"])
    assert metrics["kind_expert_mi"] == pytest.approx(base["kind_expert_mi"]) and base["kind_expert_mi"] > 0
    held_out = settings.task_set().examples("held_out", 4, 1)  # the prompts exact match asked
    assert saved["tokens"] == routing_statistics(folders["olmoe"], held_out)["tokens"]
    assert [a["prompt"] for a in json.loads((run_dir / "exact_match.json").read_text())["answers"]] == [
        e.prompt for e in held_out]
    stamp = (run_dir / "routing_stats.json").stat().st_mtime_ns
    evaluate_study_runs(runs, settings, folders["olmoe"], tmp_path)
    assert (run_dir / "routing_stats.json").stat().st_mtime_ns == stamp
    # Exported anew (a newer checkpoint, here the same weights written again): measured anew.
    later = (run_dir / "routing_stats.json").stat().st_mtime + 5
    os.utime(run_dir / "hf" / "config.json", (later, later))
    evaluate_study_runs(runs, settings, folders["olmoe"], tmp_path)
    assert (run_dir / "routing_stats.json").stat().st_mtime_ns != stamp


def test_a_sigmoid_routed_study_keeps_exact_match_without_routing(folders, tmp_path, capsys):
    runs = [study_run(tmp_path, folders["glm4_moe"])]
    base = evaluate_study_runs(runs, GenerationEval(TASKS, seed=1, num_prompts=2, max_new_tokens=2),
                               folders["glm4_moe"], tmp_path)
    assert "compare: no routing statistics: base_model=" in capsys.readouterr().out
    assert "exact_match" in runs[0]["metrics"] and "routing_change" not in runs[0]["metrics"]
    assert "accuracy" in base and "token_entropy" not in base
