"""The multi-domain testbed corpus and the domain/expert mutual information."""

import math

import lightning as L
import numpy as np
import pytest
import torch

from lightning_moe import MoELayer, testbed
from lightning_moe.callbacks import RoutingMonitor
from lightning_moe.callbacks.routing_monitor import LayerRoutingMetric, mutual_information
from lightning_moe.data import BOS_ID, TextDataModule
from lightning_moe.layer import labelled_tokens
from lightning_moe.module import MoELanguageModel
from lightning_moe.testbed import document_domain, domain_labels, parse_testbed_source

D, E, K, DOMAINS = 16, 8, 2, 4


def test_documents_are_deterministic_in_the_seed_and_cover_every_domain():
    first = list(testbed.testbed_documents(DOMAINS, seed=3, num_bytes=60_000))
    assert first == list(testbed.testbed_documents(DOMAINS, seed=3, num_bytes=60_000))
    assert first != list(testbed.testbed_documents(DOMAINS, seed=4, num_bytes=60_000))
    assert sum(len(text) for _, text in first) == 60_000
    assert {document_domain(name) for name, _ in first} == set(range(DOMAINS))


def test_languages_differ():
    """Each domain has its own byte statistics: bigram distributions far apart."""
    texts = {d: b"" for d in range(DOMAINS)}
    for name, text in testbed.testbed_documents(DOMAINS, seed=0, num_bytes=200_000):
        texts[document_domain(name)] += text
    unigrams = {d: np.bincount(np.frombuffer(t, np.uint8), minlength=256) / len(t) for d, t in texts.items()}
    for a in range(DOMAINS):
        for b in range(a + 1, DOMAINS):
            assert 0.5 * np.abs(unigrams[a] - unigrams[b]).sum() > 0.3  # total variation distance


def test_source_names():
    assert parse_testbed_source("testbed") == 4
    assert parse_testbed_source("testbed:6") == 6
    assert parse_testbed_source("stdlib") is None
    with pytest.raises(ValueError, match="2 to"):
        parse_testbed_source("testbed:1")


def test_domain_labels_follow_the_documents():
    tokens = np.array([BOS_ID, 1, 2, BOS_ID, 3, BOS_ID, 4, 5, 6], dtype=np.uint16)
    labels = domain_labels(tokens, ["domain2/0", "domain0/1", "domain1/2"], BOS_ID)
    assert labels.tolist() == [2, 2, 2, 0, 0, 1, 1, 1, 1]
    with pytest.raises(ValueError):
        domain_labels(tokens, ["domain2/0"], BOS_ID)


def test_datamodule_batches_carry_the_domain_of_every_input_token(tmp_path):
    dm = TextDataModule(source="testbed:3", seq_len=32, batch_size=4, max_bytes=100_000, cache_dir=tmp_path)
    dm.prepare_data()
    dm.setup()
    assert dm.num_domains == 3
    input_ids, targets, domains = next(iter(dm.train_dataloader()))
    assert input_ids.shape == targets.shape == domains.shape == (4, 32)
    assert set(domains.unique().tolist()) <= {0, 1, 2}
    # Labels stay aligned with the tokens when the corpus comes back from the cache.
    cached = TextDataModule(source="testbed:3", seq_len=32, batch_size=4, max_bytes=100_000, cache_dir=tmp_path)
    cached.setup()
    assert cached.loaded_from_cache
    item = cached.train_dataset[5]
    assert torch.equal(item[2], dm.train_dataset[5][2])
    stream_labels = domain_labels(cached.train_tokens, cached.train_documents, BOS_ID)
    assert len(stream_labels) == cached.num_train_tokens
    assert TextDataModule(source="stdlib").num_domains is None


def test_mutual_information_formula():
    counts = torch.tensor([[3.0, 1.0], [1.0, 3.0]])
    p = counts / counts.sum()
    expected = sum(
        float(p[i, j] * torch.log(p[i, j] / (p[i].sum() * p[:, j].sum()))) for i in range(2) for j in range(2)
    )
    assert float(mutual_information(counts)) == pytest.approx(expected, rel=1e-6)
    assert float(mutual_information(torch.ones(3, 5))) == pytest.approx(0.0, abs=1e-9)
    assert float(mutual_information(torch.eye(4) * 7)) == pytest.approx(math.log(4))
    assert float(mutual_information(torch.zeros(3, 4))) == 0.0


def _routed_mutual_information(layer: MoELayer, x: torch.Tensor, domains: torch.Tensor) -> float:
    layer.train()
    with labelled_tokens(layer, domains, DOMAINS):
        layer(x)
    assert layer.token_labels is None
    metric = LayerRoutingMetric(E)
    metric.update(layer.routing_stats)
    return float(metric.compute()["domain_expert_mi"])


def test_mutual_information_is_zero_for_a_router_that_ignores_the_input():
    layer = MoELayer(D, 16, E, K, estimator="sparsemixer_v2", backend="loop")
    torch.nn.init.zeros_(layer.router.weight)  # every token gets the same logits: routing ignores x
    domains = torch.arange(DOMAINS).repeat_interleave(2000)
    x = torch.randn(len(domains), D)
    assert _routed_mutual_information(layer, x, domains) < 0.01


def test_mutual_information_is_log_domains_for_a_perfectly_specialised_router():
    layer = MoELayer(D, 16, E, K, estimator="topk", backend="loop")
    domains = torch.arange(DOMAINS).repeat_interleave(50)
    x = torch.nn.functional.one_hot(domains, D).float() + 0.01 * torch.randn(len(domains), D)
    with torch.no_grad():
        layer.router.weight.zero_()
        for domain in range(DOMAINS):  # domain d -> experts 2d and 2d + 1
            layer.router.weight[2 * domain, domain] = 10.0
            layer.router.weight[2 * domain + 1, domain] = 9.0
    assert _routed_mutual_information(layer, x, domains) == pytest.approx(math.log(DOMAINS), abs=1e-5)


def test_no_labels_no_counts_and_a_wrong_count_is_an_error():
    layer = MoELayer(D, 16, E, K, backend="loop").train()
    layer(torch.randn(10, D))
    assert layer.routing_stats.label_expert_counts is None
    with (
        pytest.raises(ValueError, match="labels for 10 tokens"),
        labelled_tokens(layer, torch.zeros(9, dtype=torch.long), 2),
    ):
        layer(torch.randn(10, D))


def test_routing_monitor_logs_mutual_information_on_the_testbed(tmp_path):
    dm = TextDataModule(source="testbed", seq_len=32, batch_size=4, max_bytes=60_000, cache_dir=tmp_path)
    model = MoELanguageModel(
        d_model=32, n_heads=2, n_layers=2, max_seq_len=32, moe={"num_experts": 4, "top_k": 2, "ffn_hidden": 32}
    )
    trainer = L.Trainer(
        max_steps=2,
        log_every_n_steps=1,
        limit_val_batches=0,
        callbacks=[RoutingMonitor(histograms=False, heatmap=False)],
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=tmp_path,
    )
    trainer.fit(model, dm)
    for layer in ("layer_00", "layer_01"):
        value = float(trainer.callback_metrics[f"moe/{layer}/domain_expert_mi"])
        assert 0.0 <= value <= math.log(4)
