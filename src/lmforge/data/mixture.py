"""Weighted mixtures of corpora (`data.mixture`), interleaved deterministically by bytes.

Weights are shares of the mixed *text* (UTF-8 bytes), as LLaMA's "sampling proportion" column is a share of
training tokens. Documents are interleaved by smooth weighted round robin on bytes: the next document comes
from the source furthest below its share, i.e. argmin(bytes_emitted_i / weight_i), ties to the first listed.
That needs no random numbers, gives the same stream every run, and every prefix of the stream has the
target proportions to within one document — so a run that reads only part of the data still sees the mix.

Stopping: `first_exhausted` (default) ends when any source runs out (no document is repeated);
`all_exhausted` restarts a source that ran out (upsampling it, LLaMA's ">1 epochs" for small sources) until
every source has been read through at least once.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterator, Mapping
from typing import Any

from lmforge.data.corpus import SPLITS, Corpus, Document
from lmforge.errors import ConfigError

STOPPING = ("first_exhausted", "all_exhausted")


class MixtureCorpus(Corpus):
    """`components`: name -> {"corpus": Corpus, "weight": float}. Both splits mix with the same weights."""

    def __init__(self, components: Mapping[str, Mapping[str, Any]], stopping: str = "first_exhausted") -> None:
        if not components:
            raise ConfigError("data.mixture", "is empty", "give at least one source: data.mixture.<name>={corpus: ..., weight: 1.0}")
        if stopping not in STOPPING:
            raise ConfigError("data.mixture_stopping", f"{stopping!r} is not one of {STOPPING}", "use first_exhausted or all_exhausted")
        self.names: list[str] = []
        self.corpora: list[Corpus] = []
        self.weights: list[float] = []
        for name, comp in components.items():
            if not isinstance(comp, Mapping) or "corpus" not in comp:
                raise ConfigError(f"data.mixture.{name}", "has no corpus", f"set data.mixture.{name}.corpus (a corpus config with _target_)")
            weight = float(comp.get("weight", 1.0))
            if not weight >= 0.0:
                raise ConfigError(f"data.mixture.{name}.weight", f"must be >= 0, got {weight}", "use a non-negative share")
            if weight == 0.0:
                continue
            self.names.append(str(name))
            self.corpora.append(comp["corpus"])
            self.weights.append(weight)
        if not self.names:
            raise ConfigError("data.mixture", "all weights are 0", "give at least one source a positive weight")
        total = sum(self.weights)
        self.weights = [w / total for w in self.weights]
        self.stopping = stopping

    def iter_documents(self, split: str) -> Iterator[Document]:
        if split not in SPLITS:
            raise ConfigError("split", f"unknown split {split!r}", f"use one of {SPLITS}")
        n = len(self.corpora)
        iters = [iter(c.iter_documents(split)) for c in self.corpora]
        emitted = [0] * n
        passes = [0] * n
        done_once = [False] * n
        while True:
            i = min(range(n), key=lambda k: (emitted[k] / self.weights[k], k))
            doc = next(iters[i], None)
            if doc is None:
                done_once[i] = True
                if self.stopping == "first_exhausted" or all(done_once):
                    return
                passes[i] += 1
                iters[i] = iter(self.corpora[i].iter_documents(split))
                doc = next(iters[i], None)
                if doc is None:  # an empty source cannot be upsampled
                    return
            emitted[i] += max(1, len(doc.text.encode("utf-8")))
            suffix = f"@{passes[i]}" if passes[i] else ""
            yield Document(f"{self.names[i]}/{doc.name}{suffix}", doc.text)

    def documents(self, split: str) -> list[Document]:
        return list(self.iter_documents(split))

    def fingerprint(self) -> str:
        spec = {"stopping": self.stopping, "parts": [[n, w, c.fingerprint()] for n, w, c in zip(self.names, self.weights, self.corpora)]}
        return hashlib.sha256(json.dumps(spec, sort_keys=True).encode()).hexdigest()[:16]
