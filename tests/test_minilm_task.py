"""Fast tests of the MiniLM docstring-classification example task."""

from __future__ import annotations

import copy
import random
import socket

import pytest
import torch

from lora_optim.examples import minilm_task as mt


def _no_network(*args, **kwargs):
    raise AssertionError("network access attempted")


@pytest.fixture(scope="module")
def task() -> mt.TextTask:
    return mt.build_docstring_task(seed=0)


@pytest.fixture(scope="module")
def tokenizer():
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(socket, "create_connection", _no_network)
        mp.setattr(socket.socket, "connect", _no_network)
        return mt.load_tokenizer()


@pytest.fixture(scope="module")
def classifier(task) -> mt.MiniLMClassifier:
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(socket, "create_connection", _no_network)
        mp.setattr(socket.socket, "connect", _no_network)
        rng_state = torch.get_rng_state()
        model = mt.build_classifier(task.num_labels, seed=0)
        assert torch.equal(rng_state, torch.get_rng_state()), "build_classifier consumed the global torch RNG"
    return model


@pytest.fixture(scope="module")
def small_encodings(task, tokenizer):
    return mt.tokenize(task.test_texts[:12], tokenizer, max_length=64)


def test_split_is_deterministic_and_seed_dependent(task):
    uncached = mt._build_docstring_task_cached.__wrapped__  # bypass the lru_cache
    again = uncached(0, 125, 0.2, mt.DEFAULT_PACKAGES, 64, 20)
    assert again == task
    assert mt.build_docstring_task(seed=0) is task  # cached
    other = mt.build_docstring_task(seed=1)
    assert other.train_texts != task.train_texts and other.test_texts != task.test_texts


def test_build_task_leaves_python_rng_alone():
    state = random.getstate()
    mt._build_docstring_task_cached.__wrapped__(3, 40, 0.25, ("json", "email"), 64, 20)
    assert random.getstate() == state


def test_classes_balanced_and_splits_disjoint(task):
    assert task.label_names == mt.DEFAULT_PACKAGES
    counts = task.class_counts()
    assert set(counts.values()) == {(100, 25)}
    assert len(task.train_texts) == len(task.train_labels) == 600
    assert len(task.test_texts) == len(task.test_labels) == 150
    assert not set(task.train_texts) & set(task.test_texts)
    assert len(set(task.train_texts)) == len(task.train_texts)
    assert all(len(t) >= 20 and len(t.split()) <= 64 for t in task.train_texts + task.test_texts)


def test_iterate_batches_deterministic_and_rng_free(task, tokenizer):
    enc = mt.tokenize(task.train_texts[:50], tokenizer, max_length=32)
    labels = task.train_labels[:50]
    state = torch.get_rng_state()
    a = list(mt.iterate_batches(enc, labels, 16, seed=7, num_epochs=2))
    b = list(mt.iterate_batches(enc, labels, 16, seed=7, num_epochs=2))
    c = list(mt.iterate_batches(enc, labels, 16, seed=8, num_epochs=2))
    assert torch.equal(state, torch.get_rng_state())
    assert len(a) == 6 and all(x["labels"].shape == (16,) for x in a)
    assert all(torch.equal(x[k], y[k]) for x, y in zip(a, b) for k in x)
    assert any(not torch.equal(x["labels"], y["labels"]) or not torch.equal(x["input_ids"], y["input_ids"])
               for x, y in zip(a, c))
    # one epoch without drop_last visits every example exactly once
    full = list(mt.iterate_batches(enc, labels, 16, seed=7, drop_last=False, trim_padding=False))
    rows = torch.cat([x["input_ids"] for x in full])
    assert rows.shape == enc["input_ids"].shape
    assert sorted(map(tuple, rows.tolist())) == sorted(map(tuple, enc["input_ids"].tolist()))


def test_forward_shape_and_padding_invariance(classifier, task, small_encodings):
    labels = task.test_labels[:12]
    trimmed = next(mt.iterate_batches(small_encodings, labels, 12, shuffle=False))
    padded = next(mt.iterate_batches(small_encodings, labels, 12, shuffle=False, trim_padding=False))
    assert padded["input_ids"].shape == (12, 64)
    with torch.no_grad():
        logits = classifier(trimmed["input_ids"], trimmed["attention_mask"], trimmed["token_type_ids"])
        logits_padded = classifier(padded["input_ids"], padded["attention_mask"])
    assert logits.shape == (12, task.num_labels)
    torch.testing.assert_close(logits, logits_padded, atol=1e-4, rtol=1e-4)
    state = torch.get_rng_state()
    loss = mt.cross_entropy_loss(classifier, trimmed)  # train mode, but dropout is 0 by default
    assert torch.equal(state, torch.get_rng_state())
    assert loss.ndim == 0 and abs(loss.item() - torch.log(torch.tensor(6.0)).item()) < 0.2
    acc = mt.evaluate_accuracy(classifier, small_encodings, labels, batch_size=5)
    assert 0.0 <= acc <= 1.0 and classifier.training


def test_head_init_deterministic_and_rng_free(classifier):
    state = torch.get_rng_state()
    h1 = mt.MiniLMClassifier(classifier.encoder, 6, seed=3).head
    h2 = mt.MiniLMClassifier(classifier.encoder, 6, seed=3).head
    h3 = mt.MiniLMClassifier(classifier.encoder, 6, seed=4).head
    assert torch.equal(state, torch.get_rng_state())
    assert torch.equal(h1.weight, h2.weight) and not torch.equal(h1.weight, h3.weight)
    assert torch.all(h1.bias == 0)


def test_parameter_split(classifier):
    names = mt.linear_weight_names(classifier)
    assert len(names) == 36  # 6 layers x (query, key, value, attn-out dense, 2 FFN dense)
    assert all(n.startswith("encoder.") and n.endswith(".weight") for n in names)
    assert {n.split(".")[-2] for n in names} == set(mt.LORA_TARGET_MODULES)
    linear, rest = mt.split_parameters(classifier)
    assert all(p.dim() == 2 for p in linear)
    assert {id(p) for p in linear} | {id(p) for p in rest} == {id(p) for p in classifier.parameters()}
    assert not {id(p) for p in linear} & {id(p) for p in rest}
    assert any(p is classifier.head.weight for p in rest)
    groups = mt.make_param_groups(classifier, rank=8)
    assert [g["rank"] for g in groups] == [8, None]
    assert len(groups[0]["params"]) == 36


def test_peft_wrapped_encoder(classifier, task, small_encodings):
    peft = pytest.importorskip("peft")
    model = copy.deepcopy(classifier)  # PEFT injects layers in place: keep the shared fixture intact
    model.encoder = peft.get_peft_model(
        model.encoder, peft.LoraConfig(r=4, target_modules=list(mt.LORA_TARGET_MODULES))
    )
    names = mt.linear_weight_names(model)
    assert len(names) == 72 and all(".lora_" in n for n in names)
    batch = next(mt.iterate_batches(small_encodings, task.test_labels[:12], 4, shuffle=False))
    loss = mt.cross_entropy_loss(model, batch)
    loss.backward()
    linear, rest = mt.split_parameters(model)
    assert all(p.grad is not None for p in linear + rest)

    # wrapping the whole classifier: the trainable head copy stays out of the Linear group
    whole = peft.get_peft_model(
        copy.deepcopy(classifier),
        peft.LoraConfig(r=4, target_modules=["query", "value"], modules_to_save=["head"]),
    )
    names = mt.linear_weight_names(whole)
    assert len(names) == 24 and all(".lora_" in n and "head" not in n for n in names)
    linear, rest = mt.split_parameters(whole)
    assert len(linear) == 24 and rest and all(p.requires_grad for p in rest)
    assert whole(**{k: batch[k] for k in ("input_ids", "attention_mask")}).shape == (4, task.num_labels)
