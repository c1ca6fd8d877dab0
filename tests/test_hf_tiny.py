"""The tiny offline model builder: a folder that transformers loads like any released MoE model."""

import pytest
import torch

transformers = pytest.importorskip("transformers")

from lightning_moe.errors import ConfigError  # noqa: E402
from lightning_moe.hf import HFMoEBlock, from_hf  # noqa: E402
from lightning_moe.hf.tiny import FAMILIES, build_tiny_model, main  # noqa: E402

CONFIG_CLASSES = {"mixtral": "MixtralConfig", "phimoe": "PhimoeConfig", "olmoe": "OlmoeConfig",
                  "qwen2_moe": "Qwen2MoeConfig", "qwen3_moe": "Qwen3MoeConfig", "glm4_moe": "Glm4MoeConfig"}


@pytest.mark.parametrize("family", sorted(CONFIG_CLASSES))
def test_tiny_model_and_tokenizer_load_and_match(tmp_path, family):
    build_tiny_model(family, str(tmp_path), vocab_size=384, seed=1)
    model = transformers.AutoModelForCausalLM.from_pretrained(tmp_path)
    tok = transformers.AutoTokenizer.from_pretrained(tmp_path)
    config = model.config
    assert type(config).__name__ == CONFIG_CLASSES[family] and model.dtype == torch.float32
    assert config.vocab_size == len(tok) == 384 == model.get_input_embeddings().weight.shape[0]
    assert config.num_hidden_layers == 2 and config.hidden_size == 64
    assert (config.bos_token_id, config.eos_token_id, config.pad_token_id) == (
        tok.bos_token_id, tok.eos_token_id, tok.pad_token_id) == (tok.convert_tokens_to_ids("<|endoftext|>"),) * 3

    messages = [{"role": "user", "content": "What is 3 + 4?"}, {"role": "assistant", "content": "7"}]
    text = tok.apply_chat_template(messages, tokenize=False)
    assert text == "<|im_start|>user\nWhat is 3 + 4?<|im_end|>\n<|im_start|>assistant\n7<|im_end|>\n"
    prompt = tok.apply_chat_template(messages[:1], tokenize=False, add_generation_prompt=True)
    assert prompt.endswith("<|im_end|>\n<|im_start|>assistant\n")
    ids = tok(text)["input_ids"]
    assert tok.decode(ids) == text and ids.count(tok.convert_tokens_to_ids("<|im_end|>")) == 2

    experts = [m for m in model.modules() if hasattr(m, "experts")]
    assert len(experts) == 2
    routers = [p for n, p in model.named_parameters() if n.endswith((".gate.weight", ".router.weight"))]
    assert len(routers) == 2 and all(r.shape[0] == 8 and r.abs().sum() > 0 for r in routers)  # distinct logits
    batch = torch.tensor([ids])
    loss = model(batch, labels=batch).loss
    assert abs(loss.item() - torch.log(torch.tensor(384.0)).item()) < 0.5  # random init: near-uniform predictions
    from_hf(model)
    assert sum(isinstance(m, HFMoEBlock) for m in model.modules()) == 2


def test_seed_sets_the_weights_and_the_tokenizer_is_fixed(tmp_path):
    folders = [str(tmp_path / name) for name in ("a", "b", "c")]
    for folder, seed in zip(folders, (0, 0, 1)):
        build_tiny_model("qwen3_moe", folder, seed=seed)
    a, b, c = (transformers.AutoModelForCausalLM.from_pretrained(f).state_dict() for f in folders)
    assert all(torch.equal(a[k], b[k]) for k in a) and not all(torch.equal(a[k], c[k]) for k in a)
    assert (tmp_path / "a" / "tokenizer.json").read_text() == (tmp_path / "c" / "tokenizer.json").read_text()


def test_command_line_and_bad_arguments(tmp_path, capsys):
    main(["--family", "olmoe", "--output", str(tmp_path / "m"), "--seed", "3"])
    assert capsys.readouterr().out.strip() == str(tmp_path / "m")
    assert transformers.AutoConfig.from_pretrained(tmp_path / "m").model_type == "olmoe"
    with pytest.raises(SystemExit) as exit_info:
        main(["--family", "olmoe", "--output", str(tmp_path / "n"), "--vocab-size", "100"])
    assert exit_info.value.code == 2
    assert "error: vocab_size must be an integer >= 300" in capsys.readouterr().err
    with pytest.raises(ConfigError, match=r"family='gpt2' is not supported; use one of \['glm4_moe', 'mixtral'"):
        build_tiny_model("gpt2", str(tmp_path))
    with pytest.raises(ConfigError, match="the built-in corpus gives only"):
        build_tiny_model("olmoe", str(tmp_path), vocab_size=50000)
    assert sorted(FAMILIES) == sorted(CONFIG_CLASSES)
